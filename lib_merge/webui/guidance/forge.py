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

import math
import re
from typing import Optional

import torch

from ...errors import BadParameterError
from ...guidance.freeu import freeu_patch
from ...guidance.hooks import install_nag
from ...guidance.pag import identity_attention
from ...guidance.seg import blur_queries, feature_hw
from ...guidance.settings import GuidanceSettings
from . import a1111, cfgpp_samplers, console as guidance_log
from .console import log, log_once
from .guided_pass import GuidedPass, StepContext, add_seen, install_pass
from .pass_setup import effective_settings, hookable_denoiser, resolve_layers, with_freeu_channels, with_untitled
from .pass_summary import record_pass

# Shared with A1111: the sampler list and the per-generation log are host-neutral.
new_generation = guidance_log.new_generation

ROWS_KEY = "untitled_guidance_rows"
MARK_KEY = "untitled_guidance"

# Forge's built-in extensions that do what one of our methods does: (title, our method, is it on?).
BUILTINS = (
    ("FreeU Integrated", "FreeU", lambda a: bool(a and a[0])),
    ("PerturbedAttentionGuidance Integrated", "PAG", lambda a: bool(a and a[0])),
    ("DynamicThresholding (CFG-Fix) Integrated", "dynamic thresholding", lambda a: bool(a and a[0])),
    ("LatentModifier Integrated", "CFG rescale", lambda a: bool(a and a[0]) and len(a) > 9 and float(a[9] or 0) != 0),
)
BUILTIN_INFOTEXT = {"freeu_enabled": "FreeU", "pagi_enabled": "PAG", "dynthres_enabled": "dynamic thresholding"}

_ATTN_PATH = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\..*transformer_blocks\.(\d+)\.attn1$")


def attn_key(path: str) -> Optional[tuple[str, int, int]]:
    """Forge's patch key (block, number, transformer index) of an ldm module path."""
    m = _ATTN_PATH.match(path)
    if not m:
        return None
    kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
    number = 0 if kind == "middle" else int(m.group(2))
    return kind, number, int(m.group(3))


class _Cell:
    """What the patch closures read. ``clone()`` deep-copies ``model_options``, and deepcopy keeps
    functions as they are, so every clone's closures still share this one cell."""

    def __init__(self, guided: "ForgePass"):
        self.guided = guided


_CELLS: dict[str, _Cell] = {}


class ForgePass(GuidedPass):
    """Forge: the combine happens in our post-CFG function; Forge runs the forward itself."""

    # Our pre-CFG function drops Forge's uncond outright: its sampler then sees zeros, not the cond.
    cond_stands_in_for_uncond = False

    def __init__(self, denoiser, settings, *, hires, untitled=None, cfg_scale=None, model_channels=None,
                 pag_keys=(), seg_keys=(), error=None):
        super().__init__(denoiser, settings, hires=hires, untitled=untitled, cfg_scale=cfg_scale, error=error)
        self.model_channels = model_channels
        self.pag_keys = set(pag_keys)
        self.seg_keys = set(seg_keys)
        self.batched_steps = 0
        self.fallback_passes = 0
        self.diffusion_model = None  # set by prepare_sampling when NAG is on
        self.nag = None

    def install_step_hooks(self, ctx: StepContext) -> list:
        # NAG hooks the attn2 modules' to_q / to_out (Forge's CrossAttention calls both as modules,
        # replace patch or not), as on A1111; rows are set per forward by the U-Net wrapper.
        self.nag = None
        if not ctx.plan.nag or self.diffusion_model is None:
            return []
        if ctx.nag_negative is None:
            log_once("NAG skipped: the host passed no negative-prompt cross-attention context")
            return []
        s = self.settings
        self.nag = install_nag(self.diffusion_model, layers=s.nag_layers, scale=s.nag_scale, tau=s.nag_tau, alpha=s.nag_alpha)
        return [self.nag]

    def set_nag_rows(self, ctx: StepContext, cond_rows: list, batch: int) -> None:
        """Guide ``cond_rows`` (slices of one forward's batch, one row per image each)."""
        if self.nag is None:
            return
        negative = ctx.nag_negative
        if not cond_rows or any((r.stop - r.start) != negative.shape[0] for r in cond_rows):
            self.nag.set_rows([], None)
            return
        self.nag.set_rows(cond_rows, torch.cat([negative] * len(cond_rows)), batch_size=batch)

    def collect_nag(self, ctx: StepContext) -> None:
        if self.nag is not None:
            add_seen(ctx, "NAG", self.nag.take_effect())

    def row_layout(self, layout, n_images):
        # Forge folds AND sub-prompts into one cond prediction per image (weighted mean); the
        # pre-CFG function fills in their total weight, which Forge applies as "edit strength".
        return n_images, [[(i, 1.0)] for i in range(n_images)]


def _current(cell: _Cell) -> Optional[StepContext]:
    guided = cell.guided
    return guided.current if guided is not None else None


def _rows_for(ctx: StepContext) -> list[str]:
    return [r for r in ("pag", "seg") if r in ctx.plan.roles]


def make_patches(cell: _Cell, *, prev_wrapper=None, prev_cfg=None, attention_function=None,
                 calc_cond_uncond_batch=None, memory=None):
    """The patch functions of one generation (closures over ``cell``)."""

    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        ctx = _current(cell)
        if ctx is None:
            return model, cond, uncond, x, timestep, model_options
        ctx.forge_cond = cond
        strength = sum(float(item.get("strength", 1.0)) for item in cond)
        ctx.conds_list = [[(i, strength)] for i in range(ctx.n_images)]
        # One plain cond entry can be batched with our copies; areas, masks and ControlNet
        # (its residuals are computed per chunk) need Forge's own bookkeeping.
        ctx.batchable = len(cond) == 1 and not any(k in cond[0] for k in ("area", "mask")) and cond[0].get("control") is None
        if "uncond" not in ctx.plan.roles:
            uncond = None
        return model, cond, uncond, x, timestep, model_options

    def run(apply_model, args):
        if prev_wrapper is not None:
            return prev_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def unet_wrapper(apply_model, args):
        ctx = _current(cell)
        cond_or_uncond = list(args.get("cond_or_uncond", []))
        if ctx is None or cell.guided.nag is None:
            return _unet_wrapper(apply_model, args, ctx, cond_or_uncond)
        n = args["input"].shape[0]
        chunk = n // max(len(cond_or_uncond), 1)
        rows = [slice(k * chunk, (k + 1) * chunk) for k, c in enumerate(cond_or_uncond) if c == 0]
        if ctx.in_fallback:
            rows = [slice(0, n)]  # a perturbed pass: every row is a cond copy
        cell.guided.set_nag_rows(ctx, rows, n)
        try:
            return _unet_wrapper(apply_model, args, ctx, cond_or_uncond)
        finally:
            cell.guided.collect_nag(ctx)
            cell.guided.nag.set_rows([], None)

    def _unet_wrapper(apply_model, args, ctx, cond_or_uncond):
        extras = _rows_for(ctx) if ctx is not None else []
        if (not extras or ctx.in_fallback or not ctx.batchable
                or ctx.extras is not None or 0 not in cond_or_uncond):
            if ctx is not None and not ctx.in_fallback:
                ctx.forwards += 1
                ctx.rows_run += args["input"].shape[0]
            return run(apply_model, args)
        x, t, c = args["input"], args["timestep"], args["c"]
        n = x.shape[0]
        chunk = n // len(cond_or_uncond)
        k = cond_or_uncond.index(0)
        rows = slice(k * chunk, (k + 1) * chunk)
        n_new = n + chunk * len(extras)
        fits = True
        model = getattr(apply_model, "__self__", None)
        if memory is not None and model is not None:
            try:
                fits = model.memory_required([n_new] + list(x.shape[1:])) <= memory.get_free_memory(x.device)
            except Exception:  # an estimate we cannot make must not cost the batching
                fits = True
        if not fits:
            log_once("not enough free memory to batch the PAG/SEG rows with cond/uncond; running them separately")
            ctx.forwards += 1
            ctx.rows_run += n
            return run(apply_model, args)
        marks = {"batch": n_new}
        for j, role in enumerate(extras):
            marks[role] = slice(n + j * chunk, n + (j + 1) * chunk)

        def extend(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                return torch.cat([v] + [v[rows]] * len(extras))
            return v

        c2 = {key: extend(v) for key, v in c.items()}
        options = dict(c.get("transformer_options", {}))
        options[ROWS_KEY] = marks
        # Other patches size their chunks from these: our rows are cond chunks.
        chunks = cond_or_uncond + [0] * len(extras)
        options["cond_or_uncond"] = chunks
        if isinstance(options.get("cond_mark"), torch.Tensor):
            mark = options["cond_mark"]
            options["cond_mark"] = torch.cat([mark, mark.new_zeros(n_new - mark.shape[0])])
        if "cond_indices" in options:
            options["cond_indices"] = list(options["cond_indices"]) + list(range(n, n_new))
        c2["transformer_options"] = options
        nag = cell.guided.nag
        if nag is not None:
            cond_rows = [slice(j * chunk, (j + 1) * chunk) for j, c in enumerate(cond_or_uncond) if c == 0]
            cell.guided.set_nag_rows(ctx, cond_rows + [marks[role] for role in extras], n_new)
        out = run(apply_model, {**args, "input": extend(x), "timestep": extend(t), "c": c2, "cond_or_uncond": chunks})
        ctx.extras = {role: out[marks[role]] for role in extras}
        ctx.forwards += 1
        ctx.rows_run += n_new
        cell.guided.batched_steps += 1
        return out[:n]

    def attn1_replace_for(key):
        def replace(q, k, v, extra_options):
            guided = cell.guided
            marks = extra_options.get(ROWS_KEY)
            heads = extra_options["n_heads"]
            if not marks or guided is None:
                return attention_function(q, k, v, heads)
            batch = marks.get("batch")
            if batch is not None and q.shape[0] != batch:
                return attention_function(q, k, v, heads)
            seg = marks.get("seg") if key in guided.seg_keys else None
            pag = marks.get("pag") if key in guided.pag_keys else None
            if seg is not None:
                shape = extra_options.get("original_shape")
                hw = feature_hw(tuple(shape[-2:]), q.shape[1])
                q = q.clone()
                q[seg] = blur_queries(q[seg], hw, guided.settings.seg_sigma)
            out = attention_function(q, k, v, heads)
            if pag is not None:
                out[pag] = identity_attention(q[pag], k[pag], v[pag]).to(out.dtype)
            return out

        return replace

    def cfg_function(args):
        ctx = _current(cell)
        if ctx is not None:
            ctx.host_scale = float(args["cond_scale"])
        if prev_cfg is not None:
            return prev_cfg(args)
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    def extra_pass(role: str, args) -> Optional[torch.Tensor]:
        ctx = _current(cell)
        if calc_cond_uncond_batch is None or ctx is None or ctx.forge_cond is None:
            return None
        options = dict(args["model_options"])
        transformer = dict(options.get("transformer_options", {}))
        transformer[ROWS_KEY] = {role: slice(None), "batch": None}
        options["transformer_options"] = transformer
        ctx.in_fallback = True
        try:
            out, _ = calc_cond_uncond_batch(args["model"], ctx.forge_cond, None, args["input"], args["sigma"], options)
        finally:
            ctx.in_fallback = False
        ctx.forwards += 1
        ctx.rows_run += args["input"].shape[0]
        cell.guided.fallback_passes += 1
        return out

    def post_cfg(args):
        ctx = _current(cell)
        guided = cell.guided
        if ctx is None or guided is None or guided.stack is None:
            return args["denoised"]
        plan = ctx.plan
        host_scale = ctx.host_scale
        # Forge applies scale 1 where "skip early CFG" / NGMS say so: keep that, as A1111 does.
        host_one = host_scale is not None and math.isclose(host_scale, 1.0) and not math.isclose(guided.stack.cfg_scale, 1.0)
        guided.report_hooks(ctx)
        if plan.is_trivial and not host_one and not guided.stack.effects.any_pending:
            return args["denoised"]
        extras = ctx.extras or {}
        d_pag = extras.get("pag") if plan.pag_scale else None
        d_seg = extras.get("seg") if plan.seg_scale else None
        if plan.pag_scale and d_pag is None:
            d_pag = extra_pass("pag", args)
        if plan.seg_scale and d_seg is None:
            d_seg = extra_pass("seg", args)
        if plan.pag_scale and d_pag is None:
            log_once("PAG pass unavailable this step; PAG skipped there")
            plan = _replace(plan, pag_scale=0.0, sanf=False)
        if plan.seg_scale and d_seg is None:
            log_once("SEG pass unavailable this step; SEG skipped there")
            plan = _replace(plan, seg_scale=0.0)
        d_uncond = args["uncond_denoised"] if ("uncond" in plan.roles and not host_one) else None
        if d_uncond is not None and args.get("uncond") is None:
            # Forge computed no uncond (its hires pass at Hires CFG 1 drops the negative prompt):
            # uncond_denoised is zeros, so take D_u = D_c as for a skipped uncond.
            log_once("Forge ran no negative prompt in this pass (Hires CFG scale 1); guidance uses the prompt as the uncond there")
            d_uncond = None
        try:
            return guided.stack.combine(plan, ctx.step, x=args["input"], sigma=args["sigma"], d_cond=args["cond_denoised"],
                                        d_uncond=d_uncond, d_pag=d_pag, d_seg=d_seg, conds_list=ctx.conds_list)
        except (BadParameterError, RuntimeError, ValueError) as err:
            log_once(f"guidance could not combine this step ({err}); Forge's own result used there")
            guided.stack.cfgpp_state.record(args["uncond_denoised"] if d_uncond is not None else args["cond_denoised"])
            return args["denoised"]

    def output_block_patch(h, hsp, transformer_options):
        ctx = _current(cell)
        guided = cell.guided
        if ctx is None or not ctx.plan.freeu or not guided.model_channels:
            return h, hsp
        s = guided.settings
        return freeu_patch(h, hsp, model_channels=guided.model_channels, b1=s.freeu_b1, b2=s.freeu_b2,
                           s1=s.freeu_s1, s2=s.freeu_s2, version=s.freeu_version)

    return dict(pre_cfg=pre_cfg, unet_wrapper=unet_wrapper, attn1_replace_for=attn1_replace_for,
                cfg_function=cfg_function, post_cfg=post_cfg, output_block_patch=output_block_patch)


def _replace(plan, **changes):
    import dataclasses

    return dataclasses.replace(plan, **changes)


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
    cell = _Cell(guided)
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
