"""Spherical interpolation of whole tensors."""
from __future__ import annotations

import math

import torch

from .params import ALPHA, BETA
from .registry import KeyContext, merge_method

# Above this |cos θ| the arc is numerically a line (sin θ ≈ 0): interpolate linearly instead.
PARALLEL_DOT = 0.9995


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp of the directions of ``a`` and ``b`` over the whole tensor, scaled by the lerped norm
    (Shoemake 1985; norm handling as sd-mecha); lerp when (anti)parallel or a norm is zero."""
    a_flat, b_flat = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a_flat.norm(), b_flat.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, t)
    dot = float(torch.dot(a_flat / na, b_flat / nb).clamp(-1.0, 1.0))
    if abs(dot) > PARALLEL_DOT:
        return torch.lerp(a, b, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    wa = math.sin((1.0 - t) * theta) / sin_theta
    wb = math.sin(t * theta) / sin_theta
    norm = float((1.0 - t) * na + t * nb)
    direction = (a / float(na)) * wa + (b / float(nb)) * wb
    return direction * norm


@merge_method("slerp", inputs=("A", "B"), params=(ALPHA,))
def slerp(a: torch.Tensor, b: torch.Tensor, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """Spherical interpolation of each whole tensor from A (α = 0) to B (α = 1); norms are
    interpolated linearly; falls back to lerp when A and B are (anti)parallel (|cos| > 0.9995)."""
    return slerp_tensors(a, b, alpha)


@merge_method("bislerp", inputs=("A", "B", "C", "D"), params=(ALPHA, BETA))
def bislerp(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, *, ctx: KeyContext, alpha: float, beta: float) -> torch.Tensor:
    """Bilinear slerp over a 2×2 grid (our definition): slerp(slerp(A, B, α), slerp(C, D, α), β);
    corners (α, β) = (0,0) A, (1,0) B, (0,1) C, (1,1) D."""
    return slerp_tensors(slerp_tensors(a, b, alpha), slerp_tensors(c, d, alpha), beta)
