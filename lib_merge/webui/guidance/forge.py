"""Forge (main, backend/) adapter of the Untitled Guidance script.

Forge samples through ``backend.sampling.sampling_function`` and lets extensions in only through
the U-Net patcher: in ``process_before_every_sampling`` we clone
``p.sd_model.forge_objects.unet``, register our functions and assign the clone back (Forge resets
``forge_objects`` before each sampling, so the clone lives for one pass; with hires fix the hook
runs three times per image and the middle result is discarded, so patching is idempotent):

* ``set_model_sampler_pre_cfg_function``: drops the uncond when the plan says nothing reads it
  (``GuidanceStack.plan``: c ≡ u, or CFG 1 with no CFG++, dynthres, SANF or host DDIM CFG++), and
  reads the step's cond list;
* ``set_model_unet_function_wrapper``: appends copies of the cond chunk for PAG / SEG to the very
  forward Forge runs, so ``[c, u?, c_pag?, c_seg?]`` is **one** batched forward when the step has a
  single cond entry without area/mask/ControlNet and memory allows; otherwise the post-CFG function
  runs the perturbed passes as extra ``calc_cond_uncond_batch`` calls (Forge's documented way);
* ``set_model_attn1_replace`` on each chosen self-attention: identity attention (PAG) or blurred
  queries (SEG) for our rows only, Forge's own attention function for every other row;
* ``set_model_sampler_cfg_function``: notes the CFG scale Forge actually applies this step (hires
  CFG, "skip early CFG", NGMS) and chains to any previous CFG function;
* ``set_model_sampler_post_cfg_function``: the stack's combine;
* ``set_model_output_block_patch``: FreeU on the decoder's (h, h_skip).

Untitled conditioning, step tracking and CFG++ bookkeeping go through the sampler's
``CFGDenoiser`` exactly as on A1111 (``guided_pass.GuidedPass``).
"""
from __future__ import annotations

from typing import Optional

from ...guidance.settings import GuidanceSettings
from . import a1111, cfgpp_samplers, console as guidance_log
from .console import log, log_once
from .forge_patches import ForgePass, PatchCell, attn_key, make_patches
from .guided_pass import install_pass
from .pass_setup import effective_settings, hookable_denoiser, resolve_layers, with_freeu_channels, with_untitled
from .pass_summary import record_pass

# Shared with A1111: the sampler list and the per-generation log are host-neutral.
new_generation = guidance_log.new_generation

MARK_KEY = "untitled_guidance"

# Forge's built-in extensions that do what one of our methods does: (title, our method, is it on?).
BUILTINS = (
    ("FreeU Integrated", "FreeU", lambda a: bool(a and a[0])),
    ("PerturbedAttentionGuidance Integrated", "PAG", lambda a: bool(a and a[0])),
    ("DynamicThresholding (CFG-Fix) Integrated", "dynamic thresholding", lambda a: bool(a and a[0])),
    ("LatentModifier Integrated", "CFG rescale", lambda a: bool(a and a[0]) and len(a) > 9 and float(a[9] or 0) != 0),
)
BUILTIN_INFOTEXT = {"freeu_enabled": "FreeU", "pagi_enabled": "PAG", "dynthres_enabled": "dynamic thresholding"}

# One cell per patched clone, by the token in its model options: Forge's closures find their pass here.
_CELLS: dict[str, PatchCell] = {}


# ----------------------------------------------------------------------------------- installing

def builtin_conflicts(p, settings: GuidanceSettings) -> list[str]:
    """Forge built-ins that are on and do what one of our active methods does."""
    ours = {"FreeU": settings.freeu_enabled, "PAG": settings.pag_on, "dynamic thresholding": settings.dynthres_enabled,
            "CFG rescale": settings.rescale_on}
    found: list[str] = []
    runner = getattr(p, "scripts", None)
    script_args = list(getattr(p, "script_args", None) or [])
    for script in getattr(runner, "alwayson_scripts", []) or []:
        try:
            title = script.title()
        except Exception:
            continue
        for prefix, method, is_on in BUILTINS:
            if not title.startswith(prefix) or not ours[method]:
                continue
            try:
                args = script_args[script.args_from:script.args_to]
                if is_on(args):
                    found.append(f"{title} ({method})")
            except Exception:
                continue
    for key, method in BUILTIN_INFOTEXT.items():
        if ours[method] and (getattr(p, "extra_generation_params", None) or {}).get(key) and not any(method in f for f in found):
            found.append(f"{key} ({method})")
    return found


def _model_channels(unet) -> Optional[int]:
    diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    config = getattr(diffusion_model, "config", None)
    value = config.get("model_channels") if isinstance(config, dict) else getattr(diffusion_model, "model_channels", None)
    return int(value) if value else None


def _layer_keys(unet, settings: GuidanceSettings) -> tuple[GuidanceSettings, list, list]:
    diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        if settings.pag_on or settings.seg_on:
            log("the Forge U-Net has no diffusion_model: PAG and SEG skipped")
        return settings.replace(pag_scale=0.0, seg_scale=0.0), [], []
    settings, pag_layers, seg_layers = resolve_layers(diffusion_model, settings)
    pag_keys = [attn_key(path) for _, path, _ in pag_layers]
    seg_keys = [attn_key(path) for _, path, _ in seg_layers]
    if None in pag_keys or None in seg_keys:
        log("PAG/SEG skipped: this U-Net's attention paths do not map to Forge patch keys")
        return settings.replace(pag_scale=0.0, seg_scale=0.0), [], []
    return settings, pag_keys, seg_keys


def _host_api():
    """Forge's backend pieces we call, imported lazily and feature-probed."""
    from backend.attention import attention_function
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    try:
        from backend import memory_management
    except Exception:
        memory_management = None
    return attention_function, calc_cond_uncond_batch, memory_management


def patch_unet(p, guided: ForgePass, token: str) -> bool:
    """Clone ``forge_objects.unet``, register our patches, assign the clone back. Idempotent: a
    U-Net already carrying this generation's mark only gets its pass swapped."""
    forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    unet = getattr(forge_objects, "unet", None)
    needed = ("clone", "set_model_sampler_post_cfg_function", "set_model_sampler_cfg_function",
              "set_model_attn1_replace", "set_model_output_block_patch", "set_model_unet_function_wrapper",
              "set_model_sampler_pre_cfg_function")
    if unet is None or not all(hasattr(unet, n) for n in needed):
        log("this Forge has no U-Net patcher with the hooks we need; guidance skipped")
        return False
    options = getattr(unet, "model_options", {}) or {}
    mark = options.get(MARK_KEY)
    if mark is not None and mark in _CELLS:
        _CELLS[mark].guided = guided
        return True
    try:
        attention_function, calc, memory = _host_api()
    except Exception as err:
        log(f"Forge backend pieces missing ({err}); guidance skipped")
        return False
    cell = PatchCell(guided)
    _CELLS.clear()  # one live generation at a time: Forge samples on its main thread
    _CELLS[token] = cell
    unet = unet.clone()
    fns = make_patches(cell, prev_wrapper=options.get("model_function_wrapper"), prev_cfg=options.get("sampler_cfg_function"),
                       attention_function=attention_function, calc_cond_uncond_batch=calc, memory=memory)
    s = guided.settings
    unet.set_model_sampler_pre_cfg_function(fns["pre_cfg"])
    unet.set_model_sampler_cfg_function(fns["cfg_function"])
    # We decide when the uncond is skipped (pre-CFG), so Forge's CFG-1 shortcut must not.
    unet.set_model_sampler_post_cfg_function(fns["post_cfg"], disable_cfg1_optimization=True)
    if s.pag_on or s.seg_on or s.nag_on:
        unet.set_model_unet_function_wrapper(fns["unet_wrapper"])
        for key in sorted(guided.pag_keys | guided.seg_keys):
            unet.set_model_attn1_replace(fns["attn1_replace_for"](key), key[0], key[1], key[2])
    if s.freeu_enabled:
        unet.set_model_output_block_patch(fns["output_block_patch"])
    unet.model_options[MARK_KEY] = token
    forge_objects.unet = unet
    return True


def prepare_sampling(p, settings: GuidanceSettings, *, error: Optional[BaseException] = None, token: str = "") -> Optional[ForgePass]:
    """``process_before_every_sampling`` on Forge. Never raises."""
    denoiser = hookable_denoiser(p, settings, error)
    if denoiser is None:
        return None
    hires = bool(getattr(p, "is_hr_pass", False))
    if error is not None:
        return install_pass(denoiser, ForgePass(denoiser, settings, hires=hires, error=error))
    settings = effective_settings(p, settings)
    if not settings.any_on:
        return None
    model = getattr(p, "sd_model", None)
    if not any(getattr(model, f"is_{k}", False) for k in ("sd1", "sd2", "sdxl")):
        log("only SD1.x, SD2.x and SDXL checkpoints are supported; guidance skipped")
        return None
    conflicts = builtin_conflicts(p, settings)
    if conflicts:
        log_once(f"Forge built-in also on: {', '.join(conflicts)}; both will apply. Turn one of them off.")
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    settings, pag_keys, seg_keys = _layer_keys(unet, settings)
    settings, channels = with_freeu_channels(settings, lambda: _model_channels(unet))
    settings, untitled = with_untitled(p, settings, lambda: p.sd_model)
    if not settings.any_on:
        return None
    cfg = float(getattr(p, "hr_cfg", p.cfg_scale)) if hires and hasattr(p, "hr_cfg") else None
    guided = ForgePass(denoiser, settings, hires=hires, untitled=untitled, cfg_scale=cfg, model_channels=channels,
                       pag_keys=pag_keys, seg_keys=seg_keys)
    if settings.nag_on:
        guided.diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
        if guided.diffusion_model is None:
            log("the Forge U-Net has no diffusion_model: NAG skipped")
    if not patch_unet(p, guided, token or f"ug-{id(p)}-{id(denoiser)}"):
        # Untitled and CFG++ live on the denoiser and still work without the U-Net patches.
        guided.settings = settings = settings.replace(pag_scale=0.0, seg_scale=0.0, freeu_enabled=False, rescale_phi=0.0,
                                                      dynthres_enabled=False)
    return record_pass(p, install_pass(denoiser, guided))


def register_samplers() -> list[str]:
    return cfgpp_samplers.register_samplers(install_minimal_cfgpp)


def install_minimal_cfgpp(model, settings: GuidanceSettings) -> None:
    """CFG++ sampler running without the script (``cfgpp_samplers.ensure_cfgpp_driver``)."""
    p = getattr(model, "p", None)
    if p is None:
        log("CFG++ sampler: no processing object on the denoiser; cannot guide")
        return
    prepare_sampling(p, settings)


def finish(p) -> None:
    """``postprocess_batch``: restore the denoiser; the patched clone stays in ``forge_objects``
    until Forge resets it for the next sampling, but its patches find no pass and do nothing."""
    a1111.finish(p)
    for cell in _CELLS.values():
        cell.guided = None
    _CELLS.clear()
