"""A host-free CFG denoiser that runs a ``GuidanceStack``: the reference for the host adapters.

It does what an adapter does inside the host's sampler loop: plan the step, build one batched
forward with explicit rows ``[c…, u…, c_pag…, c_seg…]``, point the attention hooks at their rows,
split the output by role, and combine. With ``batched=False`` it runs one forward per role
instead (for benchmarks and equivalence tests). It is a k-diffusion-style model
``D = denoiser(x, sigma)`` and carries ``cfgpp_state`` for the CFG++ samplers.

Steps are sampler steps: ``calls_per_step=2`` for samplers that evaluate the model twice per
step (Heun, DPM2, DPM++ SDE, ...; A1111's ``second_order`` flag), so both calls share the step
that windows, schedules, APG's momentum and CFG-Zero*'s zero-init count. After each forward it
tells the stack what the PAG/SEG/NAG/FreeU hooks did (proof of effect), as an adapter must.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .cfg import CondRows, CondsList
from .hooks import install_attention_perturbations, install_freeu, install_nag
from .stack import GuidanceStack, StepPlan


def _rows_of_cond(cond: Any, index: torch.Tensor) -> Any:
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def _cat_conds(parts: list) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _n_rows(cond: Any) -> int:
    return next(iter(cond.values())).shape[0] if isinstance(cond, dict) else cond.shape[0]


def _context(cond: Any) -> torch.Tensor:
    """The cross-attention context of a conditioning (SDXL dicts carry it as ``crossattn``)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


class GuidedDenoiser:
    """``denoiser(x, sigma) -> D`` for an image batch, guided by ``stack``; call ``close()`` when done."""

    def __init__(
        self,
        inner: Callable[..., torch.Tensor],
        stack: GuidanceStack,
        *,
        diffusion_model: nn.Module,
        cond: Any,
        uncond: Any,
        conds_list: CondsList | None = None,
        batched: bool = True,
        model_channels: int | None = None,
        nag_negative: Any = None,
        calls_per_step: int = 1,
    ):
        self.inner = inner
        self.stack = stack
        self.cond, self.uncond, self.conds_list = cond, uncond, conds_list
        self.n_cond, self.n_uncond = _n_rows(cond), _n_rows(uncond)
        self.rows = CondRows(conds_list, self.n_cond, self.n_uncond)
        self.batched = batched
        self.calls_per_step = int(calls_per_step)
        self.calls = 0
        # Per model call (not per sampler step, despite the names kept for existing readers).
        self.rows_per_step: list[int] = []
        self.forwards_per_step: list[int] = []
        # NAG's negative context, one row per image (default: the uncond); per cond row below.
        self.nag_negative = self.rows.per_row(_context(uncond if nag_negative is None else nag_negative))
        s = stack.settings
        self._perturb = None
        if stack.pag_on or stack.seg_on:
            self._perturb = install_attention_perturbations(
                diffusion_model, pag_rows=None, seg_rows=None,
                pag_layers=s.pag_layers if stack.pag_on else "", seg_layers=s.seg_layers if stack.seg_on else "",
                seg_sigma=s.seg_sigma, latent_hw=(1, 1),
            )
        self._nag = None
        if stack.nag_on:
            self._nag = install_nag(diffusion_model, layers=s.nag_layers, scale=s.nag_scale, tau=s.nag_tau, alpha=s.nag_alpha)
        self._seen: dict = {}
        self._freeu = None
        if stack.freeu_on:
            channels = model_channels or diffusion_model.model_channels
            self._freeu = install_freeu(
                diffusion_model, s, model_channels=channels, active=lambda: self.stack.freeu_active(self.step)
            )

    @property
    def step(self) -> int:
        """The sampler step of the current model call."""
        return self.calls // self.calls_per_step

    @property
    def cfgpp_state(self):
        return self.stack.cfgpp_state

    @property
    def effects(self):
        """The stack's proof-of-effect report."""
        return self.stack.effects

    def _role_inputs(self, role: str, x: torch.Tensor):
        if role == "uncond":
            return x, self.uncond
        # Cond rows (and their perturbed copies) take the latent of the image they belong to.
        return self.rows.per_row(x), self.cond

    def _forward(self, roles: tuple[str, ...], x: torch.Tensor, sigma: torch.Tensor, plan: StepPlan) -> dict[str, torch.Tensor]:
        xs, sigmas, conds = [], [], []
        for role in roles:
            x_r, c_r = self._role_inputs(role, x)
            xs.append(x_r)
            sigmas.append(self.rows.per_row(sigma) if role != "uncond" else sigma)
            conds.append(c_r)
        sub = StepPlan(step=plan.step, roles=roles, cfg_scale=plan.cfg_scale, host_cfg_scale=plan.host_cfg_scale, nag=plan.nag)
        rows = sub.rows(self.n_cond, self.n_uncond)
        batch = sum(t.shape[0] for t in xs)
        if self._perturb is not None:
            self._perturb.set_latent_hw(tuple(x.shape[-2:]))
            self._perturb.set_rows(pag_rows=rows.get("pag"), seg_rows=rows.get("seg"), batch_size=batch)
        if self._nag is not None:
            guided = sub.nag_rows(self.n_cond, self.n_uncond)
            negative = torch.cat([self.nag_negative] * len(guided)) if guided else None
            self._nag.set_rows(guided, negative, batch_size=batch)
        out = self.inner(torch.cat(xs), torch.cat(sigmas), cond=_cat_conds(conds))
        self._collect_hook_effects()
        self.rows_per_step[-1] += out.shape[0]
        self.forwards_per_step[-1] += 1
        return {role: out[r] for role, r in rows.items()}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        plan = self.stack.plan(self.step, sigma=sigma)
        self.rows_per_step.append(0)
        self.forwards_per_step.append(0)
        self._seen = {}
        if self.batched:
            outs = self._forward(plan.roles, x, sigma, plan)
        else:
            outs = {}
            for role in plan.roles:
                outs.update(self._forward((role,), x, sigma, plan))
        if self.stack.effects.any_pending:
            self._report_hooks(plan)
        denoised = self.stack.combine(
            plan, self.step, x=x, sigma=sigma, d_cond=outs["cond"], d_uncond=outs.get("uncond"),
            d_pag=outs.get("pag"), d_seg=outs.get("seg"), conds_list=self.conds_list,
        )
        self.calls += 1
        return denoised

    def _collect_hook_effects(self) -> None:
        seen = self._seen
        if self._perturb is not None:
            for method, n in self._perturb.take_effect().items():
                seen[method] = seen.get(method, 0) + n
        if self._nag is not None:
            applied, change, reference = self._nag.take_effect()
            n, c, r = seen.get("NAG", (0, 0.0, 0.0))
            seen["NAG"] = (n + applied, max(c, change), max(r, reference))
        if self._freeu is not None:
            forwards, patched = self._freeu.take_effect()
            f, p = seen.get("FreeU", (0, 0))
            seen["FreeU"] = (f + forwards, p + patched)

    def _report_hooks(self, plan: StepPlan) -> None:
        """Tell the stack what the hooks did in this call's forwards (the adapters do the same)."""
        self.stack.note_hooks(plan, self._seen)

    def close(self) -> None:
        for handle in (self._perturb, self._nag, self._freeu):
            if handle is not None:
                handle.remove()
        self.stack.finish()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
