"""Guidance for sampling: pure tensor math per technique plus a host-agnostic stack.

``settings`` holds the knobs, ``stack`` plans passes and combines predictions, ``combiners``
holds the alternatives to the CFG combine (APG, CFG-Zero*, TCFG, MaHiRo, Skimmed CFG, FDG),
``hooks`` applies PAG/SEG/NAG/FreeU inside an ldm-layout U-Net, ``effect`` is the proof-of-effect
report, ``cfgpp`` holds the CFG++ samplers, and ``runner`` is a host-free denoiser that ties them
together (the reference for the WebUI adapters).
"""
from .apg import ApgMomentum, apg_combine
from .cfg import CondRows, append_dims, cfg_combine, guidance_delta
from .cfg_zero import cfg_zero_star, optimized_scale
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
from .effect import INFOTEXT_KEY, EffectReport, MethodCheck
from .fdg import fdg_combine
from .freeu import backbone_scale, fourier_filter, freeu_patch
from .hooks import (
    AttentionPerturbations,
    FreeUHooks,
    NagHooks,
    block_key,
    find_attention_layers,
    install_attention_perturbations,
    install_freeu,
    install_nag,
    parse_block_spec,
)
from .interval import SigmaInterval
from .mahiro import mahiro
from .nag import multihead_attention, nag_attention
from .pag import identity_attention, pag_term, perturbed_self_attention
from .rescale import RESCALE_SPACE, RESCALE_SPACES, cfg_rescale
from .runner import GuidedDenoiser
from .sanf import saliency, sanf_fuse
from .seg import blur_queries, feature_hw, gaussian_kernel_size, seg_blur_2d, seg_term
from .skimmed import skimmed_combine, skimmed_predictions
from .settings import GuidanceSettings
from .stack import ROLES, GuidanceStack, StepPlan
from .tcfg import tcfg_combine, tcfg_uncond
from .window import StepWindow

__all__ = [
    "INFOTEXT_KEY",
    "ApgMomentum",
    "EffectReport",
    "MethodCheck",
    "NagHooks",
    "SigmaInterval",
    "apg_combine",
    "cfg_zero_star",
    "fdg_combine",
    "install_nag",
    "mahiro",
    "multihead_attention",
    "nag_attention",
    "optimized_scale",
    "skimmed_combine",
    "skimmed_predictions",
    "tcfg_combine",
    "tcfg_uncond",
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
