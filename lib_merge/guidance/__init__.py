"""Guidance for sampling: pure tensor math per technique plus a host-agnostic stack.

``settings`` holds the knobs, ``stack`` plans passes and combines predictions, ``hooks`` applies
PAG/SEG/FreeU inside an ldm-layout U-Net, ``cfgpp`` holds the CFG++ samplers, and ``runner``
is a host-free denoiser that ties them together (the reference for the WebUI adapters).
"""
from .cfg import CondRows, append_dims, cfg_combine, guidance_delta
from .cfgpp import (
    CfgppState,
    cfgpp_equivalent_scale,
    cfgpp_state_of,
    get_ancestral_step,
    sample_ddim_cfgpp,
    sample_dpmpp_2m_cfgpp,
    sample_euler_ancestral_cfgpp,
    sample_euler_cfgpp,
)
from .dynthres import DynThresholdConfig, dynamic_threshold, schedule_scale
from .freeu import backbone_scale, fourier_filter, freeu_patch
from .hooks import (
    AttentionPerturbations,
    FreeUHooks,
    block_key,
    find_attention_layers,
    install_attention_perturbations,
    install_freeu,
    parse_block_spec,
)
from .pag import identity_attention, pag_term, perturbed_self_attention
from .rescale import RESCALE_SPACE, RESCALE_SPACES, cfg_rescale
from .runner import GuidedDenoiser
from .sanf import saliency, sanf_fuse
from .seg import blur_queries, feature_hw, gaussian_kernel_size, seg_blur_2d, seg_term
from .settings import GuidanceSettings
from .stack import ROLES, GuidanceStack, StepPlan
from .window import StepWindow

__all__ = [
    "RESCALE_SPACE",
    "RESCALE_SPACES",
    "ROLES",
    "AttentionPerturbations",
    "CfgppState",
    "CondRows",
    "DynThresholdConfig",
    "FreeUHooks",
    "GuidanceSettings",
    "GuidanceStack",
    "GuidedDenoiser",
    "StepPlan",
    "StepWindow",
    "append_dims",
    "backbone_scale",
    "block_key",
    "blur_queries",
    "cfg_combine",
    "cfg_rescale",
    "cfgpp_equivalent_scale",
    "cfgpp_state_of",
    "dynamic_threshold",
    "feature_hw",
    "find_attention_layers",
    "fourier_filter",
    "freeu_patch",
    "gaussian_kernel_size",
    "get_ancestral_step",
    "guidance_delta",
    "identity_attention",
    "install_attention_perturbations",
    "install_freeu",
    "pag_term",
    "parse_block_spec",
    "perturbed_self_attention",
    "saliency",
    "sample_ddim_cfgpp",
    "sample_dpmpp_2m_cfgpp",
    "sample_euler_ancestral_cfgpp",
    "sample_euler_cfgpp",
    "sanf_fuse",
    "schedule_scale",
    "seg_blur_2d",
    "seg_term",
]
