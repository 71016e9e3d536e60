"""The host-neutral guidance of one sampling pass, routed through the sampler's own denoiser.

Both hosts sample through an A1111-style ``CFGDenoiser`` (``p.sampler.model_wrap_cfg``): its
``forward`` is where untitled conds are swapped in, the step is planned and CFG++ is fed, whatever
then runs the model (A1111: ``a1111_pass.A1111Pass``; Forge: ``forge_patches.ForgePass``). The wrapper is
installed on the instance, never on the class other generations and extensions share.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import torch

from ...guidance.settings import GuidanceSettings
from ...guidance.stack import GuidanceStack, StepPlan
from .console import log_once
from .untitled_conds import Untitled

_WRAP_ATTR = "_untitled_guidance_pass"


def conds_layout(cond) -> list[list[tuple[int, float]]]:
    """``conds_list`` of a MulticondLearnedConditioning without building tensors: rows are numbered
    in order, one per sub-prompt, as ``prompt_parser.reconstruct_multicond_batch`` does."""
    rows, out = 0, []
    for composables in cond.batch:
        entry = []
        for composable in composables:
            entry.append((rows, float(composable.weight)))
            rows += 1
        out.append(entry)
    return out


@dataclasses.dataclass
class StepContext:
    """What one denoiser call (one sampler step) runs, and what its forwards produced."""

    plan: StepPlan
    step: int
    n_cond: int
    n_images: int
    conds_list: list
    x: torch.Tensor
    sigma: torch.Tensor
    offset: int = 0  # host rows seen so far in this step (chunks arrive in row order)
    forwards: int = 0
    rows_run: int = 0
    cond_out: dict = dataclasses.field(default_factory=dict)
    pag_out: dict = dataclasses.field(default_factory=dict)
    seg_out: dict = dataclasses.field(default_factory=dict)
    # Forge: the step's compiled cond list, whether our rows can join Forge's forward, the
    # perturbed outputs of that forward, and the CFG scale Forge applied.
    forge_cond: Any = None
    batchable: bool = False
    in_fallback: bool = False
    extras: Optional[dict] = None
    host_scale: Optional[float] = None
    # NAG: the host's negative-prompt cross-attention context, one row per image (taken before the
    # untitled swap: the untitled uncond equals the cond, NAG needs the real negative prompt).
    nag_negative: Optional[torch.Tensor] = None
    # What the U-Net hooks did in this step's forwards, for the proof of effect.
    seen: dict = dataclasses.field(default_factory=dict)


class GuidedPass:
    """Guidance of one sampling pass on one host denoiser (``p.sampler.model_wrap_cfg``).

    Host-neutral part: binds the call, swaps in untitled conds, builds the stack on the first
    call (when the host has set ``steps``/``total_steps``), plans the step, keeps CFG++ fed.
    Subclasses run the call (``_run``) and install per-step model hooks.
    """

    # Whether the host gets the cond rows back in place of uncond rows the plan skips (A1111's
    # inner-model wrapper does that); a subclass whose host then sees no uncond says False.
    cond_stands_in_for_uncond = True

    def __init__(self, denoiser, settings: GuidanceSettings, *, hires: bool, untitled: Optional[Untitled] = None,
                 cfg_scale: Optional[float] = None, error: Optional[BaseException] = None):
        self.denoiser = denoiser
        self.settings = settings
        self.hires = hires
        self.untitled = untitled
        self.cfg_scale = cfg_scale
        self.error = error
        self.stack: Optional[GuidanceStack] = None
        self.current: Optional[StepContext] = None
        self.steps_seen = 0
        self.rows_per_step: list[int] = []
        self.forwards_per_step: list[int] = []

    # -- the host's step counter -> sampler step
    def step_index(self) -> int:
        d = self.denoiser
        call = int(getattr(d, "step", 0) or 0)
        steps = int(getattr(d, "steps", 0) or 0)
        total = int(getattr(d, "total_steps", 0) or 0)
        if steps > 0 and total > 0:
            # Second-order samplers make two calls per step (total = 2·steps).
            return min(call * steps // total, steps - 1)
        return call

    def total_steps(self) -> int:
        steps = int(getattr(self.denoiser, "steps", 0) or 0)
        return steps if steps > 0 else 1

    def make_stack(self, cond_scale: float) -> GuidanceStack:
        scale = self.cfg_scale if self.cfg_scale is not None else cond_scale * float(getattr(self.denoiser, "cond_scale_miltiplier", 1.0))
        same = self.untitled.same_cond() if self.untitled is not None else False
        stack = GuidanceStack(self.settings, self.total_steps(), hires=self.hires, cfg_scale=scale, untitled_same_cond=same,
                              cond_stands_in_for_uncond=self.cond_stands_in_for_uncond)
        # A CFG++ sampler attached its state to the denoiser before the first call; feed that one.
        state = self.denoiser.__dict__.get("cfgpp_state")
        if state is not None:
            stack.cfgpp_state = state
        return stack

    def bind(self, orig: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        sig = self.__dict__.get("_signature")
        if sig is None:
            sig = self._signature = inspect.signature(orig)
        return sig.bind(*args, **kwargs)

    def row_layout(self, layout: Optional[list], n_images: int) -> tuple[int, list]:
        """(cond rows, conds_list) the host runs for this call; A1111 runs one row per sub-prompt."""
        if layout:
            return sum(len(e) for e in layout), layout
        return n_images, [[(i, 1.0)] for i in range(n_images)]

    def combine(self, orig_combine: Callable, *args, **kwargs):
        return orig_combine(*args, **kwargs)

    def forward(self, orig: Callable, *args, **kwargs):
        if self.error is not None:
            # Script hooks cannot fail a request (the runner swallows their exceptions); a model
            # call can, so a bad API request surfaces here, before any U-Net work.
            raise self.error
        bound = self.bind(orig, args, kwargs)
        a = bound.arguments
        negative = negative_context(a.get("uncond"), int(getattr(self.denoiser, "step", 0) or 0)) if self.settings.nag_on else None
        if self.untitled is not None:
            cond, uncond = self.untitled.conds()
            x = a.get("x")
            if x is not None and len(cond.batch) != x.shape[0]:
                log_once(f"untitled: {len(cond.batch)} conds for a batch of {x.shape[0]}; prompt kept for this pass")
            else:
                a["cond"], a["uncond"] = cond, uncond
        if self.stack is None:
            self.stack = self.make_stack(float(a.get("cond_scale", 1.0)))
        elif self.untitled is not None:
            # A refiner switch changes the model, and with it whether c ≡ u (aesthetic score).
            self.stack.same_cond = self.untitled.same_cond()
        step = self.step_index()
        layout = conds_layout(a["cond"]) if hasattr(a.get("cond"), "batch") else None
        force = bool(layout) and any(abs(sum(w for _, w in entry) - 1.0) > 1e-6 for entry in layout)
        x, sigma = a["x"], a["sigma"]
        plan = self.stack.plan(step, sigma=self.plan_sigma(x, sigma), force_uncond=force,
                               host_reads_uncond=self.host_reads_uncond())
        n_cond, conds_list = self.row_layout(layout, x.shape[0])
        ctx = StepContext(plan, step, n_cond, x.shape[0], conds_list, x, sigma, nag_negative=negative)
        self.current = ctx
        handles = []
        try:
            handles = self.install_step_hooks(ctx)
            return self._run(orig, bound, ctx)
        finally:
            for handle in handles:
                handle.remove()
            self.current = None
            self.steps_seen += 1
            self.rows_per_step.append(ctx.rows_run)
            self.forwards_per_step.append(ctx.forwards)

    def plan_sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The k-diffusion σ of this call (the CFG interval is keyed on it). Timestep samplers
        (DDIM, PLMS, UniPC) pass an integer timestep t instead: σ = √((1 − ᾱ_t)/ᾱ_t)."""
        sigma = torch.as_tensor(sigma, device=x.device)
        if is_timestep_denoiser(self.denoiser):
            alphas = self.denoiser.alphas
            a = alphas[sigma.to(dtype=torch.long, device=alphas.device)].float()
            return ((1 - a) / a).sqrt().to(x.device)
        return sigma.float()

    def report_hooks(self, ctx: StepContext) -> None:
        """Tell the stack what the U-Net hooks did in this step's forwards (before its combine)."""
        stack, plan, seen = self.stack, ctx.plan, ctx.seen
        if stack is None or not stack.effects.any_pending:
            return
        stack.note_hooks(plan, seen)

    def host_reads_uncond(self) -> bool:
        """Whether the host's sampler reads the uncond rows itself: both hosts' *DDIM CFG++* set
        ``need_last_noise_uncond`` on this denoiser before its first call and renoise with them."""
        return bool(getattr(self.denoiser, "need_last_noise_uncond", False))

    def install_step_hooks(self, ctx: StepContext) -> list:
        return []

    def _run(self, orig: Callable, bound: inspect.BoundArguments, ctx: StepContext):
        return orig(*bound.args, **bound.kwargs)


def add_seen(ctx: StepContext, method: str, counts) -> None:
    """Accumulate a hook's ``take_effect()`` of one forward into the step's record."""
    if method == "NAG":
        n, c, r = ctx.seen.get("NAG", (0, 0.0, 0.0))
        applied, change, reference = counts
        ctx.seen["NAG"] = (n + applied, max(c, change), max(r, reference))
    elif method == "FreeU":
        f, p = ctx.seen.get("FreeU", (0, 0))
        ctx.seen["FreeU"] = (f + counts[0], p + counts[1])
    else:
        ctx.seen[method] = ctx.seen.get(method, 0) + counts


def crossattn_context(uncond) -> Optional[torch.Tensor]:
    """The cross-attention context of the host's uncond (a tensor, or SDXL's dict with ``crossattn``)."""
    if isinstance(uncond, dict):
        uncond = uncond.get("crossattn")
    return uncond if isinstance(uncond, torch.Tensor) and uncond.dim() == 3 else None


def negative_context(uncond, call: int) -> Optional[torch.Tensor]:
    """The negative prompt's cross-attention context at model call ``call``, one row per image.

    Both hosts hand ``CFGDenoiser.forward`` the scheduled conditionings (``p.uc``) and build the
    tensor inside it with ``prompt_parser.reconstruct_cond_batch``; we do the same, with the same
    call counter, so prompt editing ``[a:b:0.5]`` in the negative is followed."""
    if isinstance(uncond, (torch.Tensor, dict)):
        return crossattn_context(uncond)
    try:
        from modules import prompt_parser

        return crossattn_context(prompt_parser.reconstruct_cond_batch(uncond, call))
    except Exception:
        return None


def is_timestep_denoiser(denoiser) -> bool:
    """Whether ``denoiser`` is the host's ``CFGDenoiserTimesteps`` (DDIM, PLMS, UniPC: ε and timesteps)."""
    try:
        from modules import sd_samplers_timesteps

        return isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    except Exception:
        return False


def install_pass(denoiser, guided: GuidedPass) -> GuidedPass:
    """Route ``denoiser.forward`` (and, for A1111 passes, ``combine_denoised``) through ``guided``.

    Per instance: the sampler's denoiser lives for one sampling pass, and the class (shared by
    every generation and extension) is never touched. Calling again on the same denoiser (Forge's
    two hires calls) swaps the pass without wrapping twice.
    """
    d = denoiser.__dict__
    already = d.get(_WRAP_ATTR) is not None
    d[_WRAP_ATTR] = guided
    if already:
        return guided
    orig_forward = denoiser.forward

    def forward(*args, **kwargs):
        return denoiser.__dict__[_WRAP_ATTR].forward(orig_forward, *args, **kwargs)

    d["forward"] = forward
    if hasattr(denoiser, "combine_denoised"):
        orig_combine = denoiser.combine_denoised

        def combine_denoised(*args, **kwargs):
            return denoiser.__dict__[_WRAP_ATTR].combine(orig_combine, *args, **kwargs)

        d["combine_denoised"] = combine_denoised
    return guided


def uninstall_pass(denoiser) -> None:
    for name in (_WRAP_ATTR, "forward", "combine_denoised"):
        denoiser.__dict__.pop(name, None)


def installed_pass(denoiser) -> Optional[GuidedPass]:
    return denoiser.__dict__.get(_WRAP_ATTR) if denoiser is not None else None
