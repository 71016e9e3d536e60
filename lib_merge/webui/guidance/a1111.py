"""A1111 (v1.10) adapter of the Untitled Guidance script: the module ``guidance.host_adapter()``
gives the script there.

``prepare_sampling`` (``process_before_every_sampling``) runs the checks both hosts share
(``pass_setup``), then those only A1111 needs (InstructPix2Pix, a replacement U-Net), and installs
an ``A1111Pass`` (``a1111_pass``) on the sampler's own denoiser; ``finish`` (``postprocess_batch``)
removes it and prints what ran (``pass_summary``).

Forge (``forge.py``) reuses the sampler registration (``cfgpp_samplers``), the untitled
conditioning (``untitled_conds``) and the denoiser ``forward`` wrapper (``guided_pass``): Forge kept
A1111's ``CFGDenoiser`` interface and ``prompt_parser``.
"""
from __future__ import annotations

from typing import Optional

from ...guidance.settings import GuidanceSettings
from . import cfgpp_samplers, console as guidance_log
from .a1111_pass import A1111Pass
from .console import log, log_once
from .guided_pass import install_pass, uninstall_pass
from .pass_setup import effective_settings, hookable_denoiser, resolve_layers, with_freeu_channels, with_untitled
from .pass_summary import print_summary, record_pass

# The adapter interface the script calls on either host (``guidance.host_adapter()``).
new_generation = guidance_log.new_generation


def register_samplers() -> list[str]:
    return cfgpp_samplers.register_samplers(install_minimal_cfgpp)


def install_minimal_cfgpp(model, settings: GuidanceSettings) -> None:
    """A CFG++ sampler running without the script (``cfgpp_samplers.ensure_cfgpp_driver``): a pass
    that guides with CFG++ alone."""
    p = getattr(model, "p", None)
    install_pass(model, A1111Pass(model, settings, hires=bool(getattr(p, "is_hr_pass", False)), diffusion_model=None))


def _model_channels(diffusion_model) -> Optional[int]:
    value = getattr(diffusion_model, "model_channels", None)
    if value is None:
        config = getattr(diffusion_model, "config", None)
        if isinstance(config, dict):
            value = config.get("model_channels")
    return int(value) if value else None


def prepare_sampling(p, settings: GuidanceSettings, *, error: Optional[BaseException] = None) -> Optional[A1111Pass]:
    """``process_before_every_sampling`` on A1111: guide the sampler about to run. Never raises."""
    denoiser = hookable_denoiser(p, settings, error)
    if denoiser is None:
        return None
    hires = bool(getattr(p, "is_hr_pass", False))
    if error is not None:
        return install_pass(denoiser, A1111Pass(denoiser, settings, hires=hires, diffusion_model=None, rows_enabled=False, error=error))
    settings = effective_settings(p, settings)
    if not settings.any_on:
        return None
    from modules import shared

    model = shared.sd_model
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    rows_enabled = True
    if getattr(model, "cond_stage_key", None) == "edit":
        log_once("InstructPix2Pix checkpoints batch three blocks of rows: only FreeU is applied")
        settings = GuidanceSettings(**{f: getattr(settings, f) for f in GuidanceSettings.field_names() if f.startswith("freeu_")})
        rows_enabled = False
    if _unet_replaced():
        log_once("a replacement U-Net (sd_unet, e.g. TensorRT) runs instead of the torch modules: PAG, SEG and FreeU skipped")
        settings = settings.replace(pag_scale=0.0, seg_scale=0.0, freeu_enabled=False)
    pag_layers = seg_layers = []
    channels = None
    if diffusion_model is None:
        if settings.pag_on or settings.seg_on or settings.freeu_enabled:
            log("no shared.sd_model.model.diffusion_model on this host: PAG, SEG and FreeU skipped")
        settings = settings.replace(pag_scale=0.0, seg_scale=0.0, freeu_enabled=False)
    else:
        settings, pag_layers, seg_layers = resolve_layers(diffusion_model, settings)
        settings, channels = with_freeu_channels(settings, lambda: _model_channels(diffusion_model))
    settings, untitled = with_untitled(p, settings, lambda: shared.sd_model)
    if not settings.any_on:
        return None
    guided = A1111Pass(denoiser, settings, hires=hires, diffusion_model=diffusion_model, untitled=untitled,
                       rows_enabled=rows_enabled, pag_layers=pag_layers, seg_layers=seg_layers, model_channels=channels)
    return record_pass(p, install_pass(denoiser, guided))


def _unet_replaced() -> bool:
    try:
        from modules import sd_unet

        return getattr(sd_unet, "current_unet", None) is not None
    except Exception:
        return False


def finish(p) -> None:
    """``postprocess_batch``: restore the sampler's denoiser (hooks on the U-Net never outlive a
    model call) and print what ran."""
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    if denoiser is not None:
        uninstall_pass(denoiser)
    print_summary(p)
