"""CFG-Zero* (Fan, Zheng, Yeh, Liu, arXiv 2503.18886; official code WeichenFan/CFG-Zero-star).

Optimized scale: the uncond is scaled by the least-squares factor that best matches it to the
cond, ``s* = ⟨v_c, v_u⟩ / ‖v_u‖²`` per sample, then ``v̂ = s*·v_u + w·(v_c − s*·v_u)``. Zero-init:
the first K sampler steps output v̂ = 0. The paper works on the flow velocity; here the noise
direction g = x − D plays that role (s* is invariant to a common per-sample factor, so it is
the same on g, ε or v), which gives in D space (derived):

    D = (1 − s*)(1 − w)·x + s*·D_u + w·(D_c − s*·D_u)

and a zero-init step gives D = x. ComfyUI's ``CFGZeroStar`` (``comfy_extras/nodes_cfg.py``)
computes s* the same way but rescales the denoised D_u, ``D = s*·D_u + w·(D_c − s*·D_u)``; it
is the paper's result plus (w − 1)(1 − s*)·x and is offered as ``form="comfyui"``. It has no
zero-init.
"""
from __future__ import annotations

import torch

from ..errors import BadParameterError

CFG_ZERO_FORMS = ("paper", "comfyui")
_EPS = 1e-8  # the official code's denominator guard


def optimized_scale(g_cond: torch.Tensor, g_uncond: torch.Tensor) -> torch.Tensor:
    """s* = ⟨g_c, g_u⟩ / (‖g_u‖² + 1e-8) per sample, shaped to broadcast (CFG-Zero* eq. 8)."""
    c, u = g_cond.flatten(1), g_uncond.flatten(1)
    s = (c * u).sum(dim=1) / ((u * u).sum(dim=1) + _EPS)
    return s.reshape((-1,) + (1,) * (g_cond.ndim - 1))


def cfg_zero_star(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    *,
    form: str = "paper",
    optimized: bool = True,
) -> torch.Tensor:
    """The guided D of CFG-Zero* without zero-init (``optimized=False`` gives plain CFG)."""
    if form not in CFG_ZERO_FORMS:
        raise BadParameterError(f"cfgzero_form={form!r}: choose one of {', '.join(CFG_ZERO_FORMS)}")
    if not optimized:
        return d_uncond + scale * (d_cond - d_uncond)
    s = optimized_scale(x - d_cond, x - d_uncond)
    shifted = s * d_uncond
    guided = shifted + scale * (d_cond - shifted)
    if form == "paper":
        guided = guided + (1.0 - s) * (1.0 - scale) * x
    return guided
