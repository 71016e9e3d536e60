"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, arXiv 2410.02416, ICLR 2025).

The CFG update ΔD = D_c − D_u is split into the part parallel to the conditional prediction
(blamed for oversaturation) and the orthogonal part; the parallel part is weighted by η. Before
the projection the update may pass through a "reverse" momentum buffer (β < 0 in the paper) and
a per-sample L2 norm clip at r. Everything is in D (x0) space, per sample over (C, H, W).

Paper form: ``D = D_c + (w − 1)·g'``. ComfyUI's ``APG`` node (``comfy_extras/nodes_apg.py``)
returns a modified cond that the host's CFG turns into ``D = D_c + w·g'`` (at η = 1, r = 0, β = 0
that is CFG at w + 1); it is offered as ``form="comfyui"`` because its users tuned their scales
with it. Momentum advances once per sampler step (``ApgMomentum``), not once per model call as
in ComfyUI, so second-order samplers do not advance it twice.
"""
from __future__ import annotations

import torch

from ..errors import BadParameterError

APG_FORMS = ("paper", "comfyui")


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(dim=1).reshape((-1,) + (1,) * (t.ndim - 1))


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v∥, v⊥): per-sample projection of ``v`` on the direction of ``onto`` (APG arXiv 2410.02416 eq. 8)."""
    norm_sq = _per_sample_sum(onto * onto)
    # A zero prediction has no direction: everything is orthogonal to it.
    coeff = torch.where(norm_sq > 0, _per_sample_sum(v * onto) / norm_sq.clamp_min(torch.finfo(v.dtype).tiny), 0.0)
    parallel = coeff * onto
    return parallel, v - parallel


def clip_norm(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """g·min(1, r/‖g‖₂) per sample; r <= 0 disables the clip (APG arXiv 2410.02416 eq. 10)."""
    if threshold <= 0:
        return g
    norm = _per_sample_sum(g * g).sqrt()
    return g * torch.where(norm > threshold, threshold / norm.clamp_min(torch.finfo(g.dtype).tiny), 1.0)


def apg_update(
    d_cond: torch.Tensor,
    update: torch.Tensor,
    *,
    eta: float,
    norm_threshold: float,
) -> torch.Tensor:
    """g' = g⊥ + η·g∥ of the (momentum-averaged) update ``g`` after the norm clip (APG Alg. 1)."""
    g = clip_norm(update, norm_threshold)
    parallel, _ = project(g, d_cond)
    # g − (1 − η)·g∥ rather than g⊥ + η·g∥: at η = 1 the update stays g bit for bit.
    return g - (1.0 - eta) * parallel


def apg_combine(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    *,
    eta: float,
    norm_threshold: float,
    momentum: float = 0.0,
    previous: torch.Tensor | None = None,
    form: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, m): APG's guided prediction and this call's momentum buffer m = β·m_prev + ΔD.

    ``previous`` is the buffer committed by the previous sampler step (None at the start).
    Paper: D = D_c + (w − 1)·g'; ``form="comfyui"``: D = D_c + w·g'. At w = 1 the result is D_c
    in both forms (no guidance asked for; ComfyUI would otherwise add a guidance it never had).
    """
    if form not in APG_FORMS:
        raise BadParameterError(f"apg_form={form!r}: choose one of {', '.join(APG_FORMS)}")
    delta = d_cond - d_uncond
    buffer = delta if previous is None or momentum == 0 else momentum * previous + delta
    if scale == 1.0:
        return d_cond, buffer
    g = apg_update(d_cond, buffer, eta=eta, norm_threshold=norm_threshold)
    factor = scale - 1.0 if form == "paper" else scale
    return d_cond + factor * g, buffer


class ApgMomentum:
    """APG's momentum buffer, committed once per sampler step.

    The first model call of a step computes m_i = β·m_{i−1} + ΔD_i and keeps it; later calls of
    the same step (second-order samplers) read m_{i−1} without writing. A new pass needs a new
    buffer (one per ``GuidanceStack``); a batch of another shape restarts it.
    """

    def __init__(self) -> None:
        self.committed: torch.Tensor | None = None  # m_{i−1}
        self._pending: torch.Tensor | None = None  # m_i of the current step
        self.step: int | None = None

    def previous(self, step: int, like: torch.Tensor) -> torch.Tensor | None:
        """The buffer a call of ``step`` builds on (advancing to ``step`` if it is new)."""
        if self.step is None or step != self.step:
            if self.step is not None and step > self.step:
                self.committed = self._pending
            else:
                # Restarted or jumped back (a new pass reusing the stack): start again.
                self.committed = None
            self._pending = None
            self.step = step
        if self.committed is not None and self.committed.shape != like.shape:
            self.committed = None
        return self.committed

    def record(self, step: int, buffer: torch.Tensor) -> None:
        """Keep the first call's buffer of ``step``; later calls of the step do not write."""
        if self.step == step and self._pending is None:
            self._pending = buffer
