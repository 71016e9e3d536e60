"""A1111 (v1.10): how a guided pass runs its rows and combines them, one batched model forward per step.

A1111's ``CFGDenoiser.forward`` builds ``x_in`` as ``[cond rows (one per AND sub-prompt)…,
uncond rows (B)]`` and hands it to its inner model in one call (``batch_cond_uncond``) or in
chunks, always in row order. For the generation we replace, on the sampler's own denoiser
instance (``p.sampler.model_wrap_cfg``):

* ``forward``: swaps in the untitled conditioning, plans the step with the ``GuidanceStack``,
  installs the attention / FreeU hooks for this step and removes them in ``finally``;
* the inner model's ``forward`` (only during that call): each chunk it receives keeps its cond
  rows, keeps or drops its uncond rows as the plan says, and gets a copy of its cond rows per
  perturbed pass appended, so the U-Net runs ``[c…, u?, c_pag?, c_seg?]`` once; the outputs are
  split by explicit row index, the host gets back exactly the rows it asked for;
* ``combine_denoised``: the stack's combine (CFG, PAG, SEG, SANF, dynthres, rescale, CFG++).

This handles ``AND`` sub-prompts, batch > 1, skipped uncond rows (NGMS / skip early CFG: the host
then never sends uncond rows), ``batch_cond_uncond`` off (chunks), SDXL dict conds and
``c_concat`` image conditioning (every per-row tensor of the cond dict is indexed alike), and the
timestep samplers (DDIM, PLMS, UniPC: their denoiser works in ε, converted to x0 around the combine).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ...errors import BadParameterError
from ...guidance.hooks import AttentionPerturbations, NagHooks, install_freeu, install_nag
from .console import log_once
from .guided_pass import GuidedPass, StepContext, add_seen, is_timestep_denoiser


def _take_rows(obj: Any, index: torch.Tensor, n: int) -> Any:
    """Index every per-row tensor (first dim ``n``) inside a cond structure (dicts, lists)."""
    if isinstance(obj, torch.Tensor):
        return obj[index] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _take_rows(v, index, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take_rows(v, index, n) for v in obj)
    return obj


def _gather(rows: dict, n: int) -> Optional[torch.Tensor]:
    if len(rows) != n or any(i not in rows for i in range(n)):
        return None
    return torch.stack([rows[i] for i in range(n)])


class A1111Pass(GuidedPass):
    """A1111: rows through the inner model's forward, hooks on the U-Net modules, our combine."""

    def __init__(self, denoiser, settings, *, hires, diffusion_model, untitled=None, rows_enabled=True,
                 pag_layers=(), seg_layers=(), model_channels=None, error=None):
        super().__init__(denoiser, settings, hires=hires, untitled=untitled, error=error)
        self.diffusion_model = diffusion_model
        self.rows_enabled = rows_enabled
        self.pag_layers = list(pag_layers)
        self.seg_layers = list(seg_layers)
        self.model_channels = model_channels
        self.perturb: Optional[AttentionPerturbations] = None
        self.nag: Optional[NagHooks] = None
        self.freeu = None
        self.eps_space = is_timestep_denoiser(denoiser)

    def install_step_hooks(self, ctx: StepContext) -> list:
        handles = []
        plan = ctx.plan
        if self.diffusion_model is None:
            return handles
        self.perturb = None
        pag = self.pag_layers if "pag" in plan.roles else []
        seg = self.seg_layers if "seg" in plan.roles else []
        if pag or seg:
            self.perturb = AttentionPerturbations(
                pag, seg, pag_rows=None, seg_rows=None, seg_sigma=self.settings.seg_sigma, latent_hw=tuple(ctx.x.shape[-2:])
            )
            handles.append(self.perturb)
        self.freeu = None
        if plan.freeu and self.model_channels:
            self.freeu = install_freeu(self.diffusion_model, self.settings, model_channels=self.model_channels, active=lambda: True)
            handles.append(self.freeu)
        self.nag = None
        if plan.nag:
            if ctx.nag_negative is None:
                log_once("NAG skipped: the host passed no negative-prompt cross-attention context")
            else:
                s = self.settings
                self.nag = install_nag(self.diffusion_model, layers=s.nag_layers, scale=s.nag_scale, tau=s.nag_tau,
                                       alpha=s.nag_alpha)
                handles.append(self.nag)
        return handles

    def _collect(self, ctx: StepContext) -> None:
        """What the hooks did in the forward that just ran."""
        if self.perturb is not None:
            for method, n in self.perturb.take_effect().items():
                add_seen(ctx, method, n)
        if self.nag is not None:
            add_seen(ctx, "NAG", self.nag.take_effect())
        if self.freeu is not None:
            add_seen(ctx, "FreeU", self.freeu.take_effect())

    def _set_nag_rows(self, ctx: StepContext, cond_images: list, n_cond_rows: int, extra_blocks: list, batch: int) -> None:
        """Guide the chunk's cond rows (the first ``n_cond_rows``) and its PAG/SEG copies, each
        against the negative context of its own image."""
        if self.nag is None:
            return
        rows = [slice(0, n_cond_rows)] + extra_blocks if n_cond_rows else []
        if not rows:
            self.nag.set_rows([], None)
            return
        per_row = ctx.nag_negative[torch.tensor(cond_images, device=ctx.nag_negative.device, dtype=torch.long)]
        self.nag.set_rows(rows, torch.cat([per_row] * len(rows)), batch_size=batch)

    def _run(self, orig, bound, ctx):
        if not self.rows_enabled:
            return orig(*bound.args, **bound.kwargs)
        inner = getattr(self.denoiser, "inner_model", None)
        if not isinstance(inner, torch.nn.Module):
            if "pag" in ctx.plan.roles or "seg" in ctx.plan.roles:
                log_once("the sampler's inner model is not a torch module; PAG/SEG skipped")
            return orig(*bound.args, **bound.kwargs)
        inner_orig = inner.forward
        had_own = "forward" in inner.__dict__

        def forward(*args, **kwargs):
            return self.inner_call(inner_orig, ctx, *args, **kwargs)

        inner.__dict__["forward"] = forward
        try:
            return orig(*bound.args, **bound.kwargs)
        finally:
            if had_own:
                inner.__dict__["forward"] = inner_orig
            else:
                inner.__dict__.pop("forward", None)

    def inner_call(self, inner_orig, ctx: StepContext, x_in, sigma_in, *args, **kwargs):
        """One chunk of the host's rows -> one forward with our rows; returns the host's rows."""
        plan = ctx.plan
        n = x_in.shape[0]
        lo = ctx.offset
        ctx.offset += n
        n_cond, n_img = ctx.n_cond, ctx.n_images
        cond_local = [i for i in range(n) if lo + i < n_cond]
        uncond_local = [i for i in range(n) if n_cond <= lo + i < n_cond + n_img]
        other = [i for i in range(n) if lo + i >= n_cond + n_img]
        run_uncond = "uncond" in plan.roles
        keep = sorted(cond_local + (uncond_local if run_uncond else []) + other)
        pag_src = cond_local if "pag" in plan.roles else []
        seg_src = cond_local if "seg" in plan.roles else []
        index = keep + pag_src + seg_src

        row_img = [img for img, entry in enumerate(ctx.conds_list) for _ in entry]
        cond_images = [row_img[lo + i] for i in cond_local if lo + i < len(row_img)]
        if index == list(range(n)):
            self._set_nag_rows(ctx, cond_images, len(cond_images), [], n)
            out = inner_orig(x_in, sigma_in, *args, **kwargs)
            self._collect(ctx)
            ctx.forwards += 1
            ctx.rows_run += n
        else:
            out = torch.empty_like(x_in)
            if index:
                idx = torch.tensor(index, device=x_in.device, dtype=torch.long)
                perturb = self.perturb
                if perturb is not None:
                    perturb.set_latent_hw(tuple(x_in.shape[-2:]))
                    start = len(keep)
                    perturb.set_rows(
                        pag_rows=slice(start, start + len(pag_src)) if pag_src else None,
                        seg_rows=slice(start + len(pag_src), len(index)) if seg_src else None,
                        batch_size=len(index),
                    )
                start = len(keep)
                blocks = [slice(start, start + len(pag_src))] if pag_src else []
                blocks += [slice(start + len(pag_src), len(index))] if seg_src else []
                self._set_nag_rows(ctx, cond_images, len(cond_images), blocks, len(index))
                try:
                    res = inner_orig(x_in[idx], sigma_in[idx], *_take_rows(args, idx, n), **_take_rows(kwargs, idx, n))
                finally:
                    if perturb is not None:
                        perturb.set_rows(pag_rows=None, seg_rows=None)
                self._collect(ctx)
                ctx.forwards += 1
                ctx.rows_run += len(index)
                out = out.to(res.dtype)
                if keep:
                    out[keep] = res[: len(keep)]
                for j, i in enumerate(pag_src):
                    ctx.pag_out[lo + i] = res[len(keep) + j]
                for j, i in enumerate(seg_src):
                    ctx.seg_out[lo + i] = res[len(keep) + len(pag_src) + j]
        for i in cond_local:
            ctx.cond_out[lo + i] = out[i]
        if not run_uncond:
            # The host expects uncond rows back; with c ≡ u (or nothing reading D_u) they are the
            # image's first cond row, as A1111 itself fills skipped uncond rows.
            for i in uncond_local:
                first = ctx.conds_list[lo + i - n_cond][0][0]
                if first in ctx.cond_out:
                    out[i] = ctx.cond_out[first]
        return out

    def combine(self, orig_combine, x_out, conds_list, uncond, cond_scale, *rest, **kwargs):
        ctx = self.current
        if ctx is None or self.stack is None:
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)
        plan = ctx.plan
        n_img = ctx.n_images
        n_cond = x_out.shape[0] - n_img
        # Rows the host itself skipped (NGMS, skip early CFG): it combines at scale 1 then.
        host_skipped = self.rows_enabled and ctx.offset < ctx.n_cond + n_img
        self.report_hooks(ctx)
        # While a check is pending, the stack's combine (plain CFG here) resolves the hook-only ones.
        if plan.is_trivial and not host_skipped and not self.stack.effects.any_pending:
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)
        d_pag = _gather(ctx.pag_out, n_cond) if plan.pag_scale else None
        d_seg = _gather(ctx.seg_out, n_cond) if plan.seg_scale else None
        if plan.pag_scale and d_pag is None:
            log_once("PAG rows were not produced this step (another extension replaced the model call?); PAG skipped there")
            plan = dataclasses.replace(plan, pag_scale=0.0, sanf=False)
        if plan.seg_scale and d_seg is None:
            log_once("SEG rows were not produced this step; SEG skipped there")
            plan = dataclasses.replace(plan, seg_scale=0.0)
        d_cond = x_out[:n_cond]
        d_uncond = None if (host_skipped or "uncond" not in plan.roles) else x_out[n_cond:]
        x, sigma = ctx.x, ctx.sigma
        try:
            if self.eps_space:
                return self._combine_eps(plan, ctx, d_cond, d_uncond, d_pag, d_seg, conds_list)
            return self.stack.combine(plan, ctx.step, x=x, sigma=sigma, d_cond=d_cond, d_uncond=d_uncond,
                                      d_pag=d_pag, d_seg=d_seg, conds_list=conds_list)
        except (BadParameterError, RuntimeError, ValueError) as err:
            # Our combine failing (an odd batch another extension built?) must not end the image.
            log_once(f"guidance could not combine this step ({err}); plain CFG used there")
            self.stack.cfgpp_state.record(x_out[n_cond:] if d_uncond is not None else x_out[:n_img])
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)

    def _combine_eps(self, plan, ctx, d_cond, d_uncond, d_pag, d_seg, conds_list):
        """Timestep denoisers predict ε of x_t = √ᾱ·x0 + √(1−ᾱ)·ε: combine in x0, in VE form
        (x/√ᾱ = x0 + σε, σ = √((1−ᾱ)/ᾱ)), then back to ε; linear terms are unchanged by this."""
        alphas = self.denoiser.alphas
        t = ctx.sigma.to(dtype=torch.long, device=alphas.device)
        a = alphas[t].to(ctx.x.device, torch.float32)
        row_img = [img for img, entry in enumerate(ctx.conds_list) for _ in entry]

        def to_x0(eps, images):
            ai = a[images][:, None, None, None]
            return ((ctx.x[images].float() - (1 - ai).sqrt() * eps.float()) / ai.sqrt())

        rows = torch.tensor(row_img, device=ctx.x.device)
        all_img = torch.arange(ctx.n_images, device=ctx.x.device)
        x0_c = to_x0(d_cond, rows)
        x0_u = to_x0(d_uncond, all_img) if d_uncond is not None else None
        x0_p = to_x0(d_pag, rows) if d_pag is not None else None
        x0_s = to_x0(d_seg, rows) if d_seg is not None else None
        a4 = a[:, None, None, None]
        x_ve = ctx.x.float() / a4.sqrt()
        sigma_ve = ((1 - a) / a).sqrt()
        denoised = self.stack.combine(plan, ctx.step, x=x_ve, sigma=sigma_ve, d_cond=x0_c, d_uncond=x0_u,
                                      d_pag=x0_p, d_seg=x0_s, conds_list=conds_list)
        eps = (ctx.x.float() - a4.sqrt() * denoised.float()) / (1 - a4).sqrt()
        return eps.to(d_cond.dtype)


