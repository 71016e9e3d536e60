"""The checks both adapters run before guiding a pass, in ``prepare_sampling``.

A check that fails turns its method off for the pass (all guidance, for a sampler we cannot
hook) with one console line instead of failing the image: CFG++ without a CFG++ sampler, dynamic
thresholding with the host's own DDIM CFG++, attention layers or a FreeU width the U-Net does not
have, prompts the text encoder cannot encode.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ...errors import BadParameterError
from ...guidance.hooks import find_attention_layers
from ...guidance.settings import GuidanceSettings
from .cfgpp_samplers import CFGPP_SAMPLERS, sampler_name_of
from .console import TITLE, log, log_once
from .untitled_conds import Untitled, untitled_for


# Both hosts' own CFG++ sampler (modules/sd_samplers_timesteps.py), which our stack cannot step.
HOST_DDIM_CFGPP = "DDIM CFG++"


def hookable_denoiser(p, settings: GuidanceSettings, error: Optional[BaseException]):
    """The sampler's own denoiser our pass wraps, or None (one line if there was anything to guide)."""
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    if denoiser is None or not hasattr(denoiser, "forward"):
        if settings.any_on or error is not None:
            log("this host has no p.sampler.model_wrap_cfg to hook; guidance skipped")
        return None
    return denoiser


def effective_settings(p, settings: GuidanceSettings) -> GuidanceSettings:
    """Settings for this pass after the checks every host shares (CFG++ needs a CFG++ sampler)."""
    name = sampler_name_of(p)
    if name in CFGPP_SAMPLERS:
        if not settings.cfgpp_on:
            cfg = float(getattr(p, "cfg_scale", 7.0))
            lam = min(max(cfg / 12.5, 0.05), 1.0)
            log_once(f"{name} needs a CFG++ λ; none set in {TITLE}, using CFG scale / 12.5 = {lam:.3f}")
            settings = settings.replace(cfgpp=lam)
        # The sampler renoises with D_u in every pass it runs, hires included.
        settings = settings.replace(cfgpp_hires=True)
    elif settings.cfgpp_on:
        log_once(f"CFG++ skipped: sampler {name!r} is not a CFG++ sampler; choose one of {', '.join(CFGPP_SAMPLERS)}"
                 + (" (the host's 'DDIM CFG++' uses CFG/12.5 as its own λ)" if name == "DDIM CFG++" else ""))
        settings = settings.replace(cfgpp=0.0)
    if name == HOST_DDIM_CFGPP and settings.dynthres_enabled:
        # Its guidance scale is a λ, but the mimic scale lives on the CFG axis, and mapping λ there
        # (ω = λσ/(σ − σ_next)) needs the next timestep, which the host's sampler does not tell us.
        log_once(f"dynamic thresholding skipped: the host's {HOST_DDIM_CFGPP!r} guides with λ = CFG/12.5, which cannot "
                 f"be put on the CFG scale the mimic scale is measured on; use 'DDIM CFG++ (lambda)' instead")
        settings = settings.replace(dynthres_enabled=False)
    return settings


def resolve_layers(diffusion_model, settings: GuidanceSettings) -> tuple[GuidanceSettings, list, list]:
    """The attn1 modules PAG and SEG perturb; a spec or U-Net layout we cannot use -> one line, method off."""
    pag_layers, seg_layers = [], []
    if settings.pag_on:
        try:
            pag_layers = find_attention_layers(diffusion_model, settings.pag_layers)
        except BadParameterError as err:
            log(f"PAG skipped: {err}")
            settings = settings.replace(pag_scale=0.0)
    if settings.seg_on:
        try:
            seg_layers = find_attention_layers(diffusion_model, settings.seg_layers)
        except BadParameterError as err:
            log(f"SEG skipped: {err}")
            settings = settings.replace(seg_scale=0.0)
    return settings, pag_layers, seg_layers


def with_freeu_channels(settings: GuidanceSettings, channels_of: Callable[[], Optional[int]]) -> tuple[GuidanceSettings, Optional[int]]:
    """FreeU finds its decoder stages by their width (multiples of ``model_channels``): a U-Net
    that does not say it -> one line, FreeU off. ``channels_of`` is asked only when FreeU is on."""
    if not settings.freeu_enabled:
        return settings, None
    channels = channels_of()
    if channels is None:
        log("FreeU skipped: the U-Net does not say its model_channels")
        return settings.replace(freeu_enabled=False), None
    return settings, channels


def with_untitled(p, settings: GuidanceSettings, model_getter: Callable[[], Any]) -> tuple[GuidanceSettings, Optional[Untitled]]:
    """The pass's untitled conditioning, built now; one that cannot be built -> one line, untitled off."""
    if settings.untitled == "off":
        return settings, None
    try:
        return settings, untitled_for(p, settings, model_getter)
    except Exception as err:  # a text encoder that cannot encode our prompts must not stop the image
        log(f"untitled skipped: could not build its conditioning ({err})")
        return settings.replace(untitled="off"), None
