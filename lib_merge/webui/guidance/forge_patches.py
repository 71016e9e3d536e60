"""The functions the Forge adapter registers on a U-Net patcher clone (see ``forge``'s docstring
for which hook each one is): the pass they serve (``ForgePass``), the cell that lets every clone's
closures find it, and the closures themselves (``make_patches``). Kept apart from the installing
code so the per-step behaviour can be read in one place."""
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
from .console import log_once
from .guided_pass import GuidedPass, StepContext, add_seen

ROWS_KEY = "untitled_guidance_rows"

_ATTN_PATH = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\..*transformer_blocks\.(\d+)\.attn1$")


def attn_key(path: str) -> Optional[tuple[str, int, int]]:
    """Forge's patch key (block, number, transformer index) of an ldm module path."""
    m = _ATTN_PATH.match(path)
    if not m:
        return None
    kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[m.group(1)]
    number = 0 if kind == "middle" else int(m.group(2))
    return kind, number, int(m.group(3))


class PatchCell:
    """What the patch closures read. ``clone()`` deep-copies ``model_options``, and deepcopy keeps
    functions as they are, so every clone's closures still share this one cell."""

    def __init__(self, guided: "ForgePass"):
        self.guided = guided


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


def _current(cell: PatchCell) -> Optional[StepContext]:
    guided = cell.guided
    return guided.current if guided is not None else None


def _rows_for(ctx: StepContext) -> list[str]:
    return [r for r in ("pag", "seg") if r in ctx.plan.roles]


def make_patches(cell: PatchCell, *, prev_wrapper=None, prev_cfg=None, attention_function=None,
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
