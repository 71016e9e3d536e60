"""TCFG, tangential damping CFG (Kwon, Kim, Jeong, Hsiao, Uh, arXiv 2503.18137, CVPR 2025).

The unconditional direction keeps only its component along the first right singular vector of
``A = [g_u; g_c]`` (g = x − D, flattened per sample), which drops the tangential part that is
misaligned with the conditional manifold; then plain CFG runs with the new D_u. As ComfyUI's
``nodes_tcfg.py``. The SVD of the 2×N matrix is done through its 2×2 Gram matrix (derived,
exact): with (λ₁, u₁) the top eigenpair of G = A·Aᵀ, v₁ = Aᵀu₁/√λ₁ and
``g_u' = ⟨g_u, v₁⟩·v₁ = (G[0]·u₁/λ₁)·Aᵀu₁``.
"""
from __future__ import annotations

import torch


def tcfg_uncond(x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor) -> torch.Tensor:
    """D_u' = x − ⟨g_u, v₁⟩·v₁ (TCFG arXiv 2503.18137 Alg. 1), per sample; fp64 for the 2×2 eigenproblem."""
    shape, dtype = d_uncond.shape, d_uncond.dtype
    g_u = (x - d_uncond).flatten(1).double()
    g_c = (x - d_cond).flatten(1).double()
    a = torch.stack([g_u, g_c], dim=1)  # B × 2 × N
    gram = a @ a.transpose(1, 2)  # B × 2 × 2
    values, vectors = torch.linalg.eigh(gram)
    lam, u1 = values[:, 1], vectors[:, :, 1]  # eigh sorts ascending
    coeff = (gram[:, 0, :] * u1).sum(dim=1)
    # Both directions zero: nothing to project, keep the uncond as it is.
    factor = torch.where(lam > 0, coeff / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0.0)
    g_proj = factor[:, None] * (a.transpose(1, 2) @ u1[:, :, None]).squeeze(2)
    g_proj = torch.where((lam > 0)[:, None], g_proj, g_u)
    return (x.flatten(1).double() - g_proj).reshape(shape).to(dtype)


def tcfg_combine(x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """D = D_u' + w·(D_c − D_u') with the tangentially damped D_u' (TCFG)."""
    damped = tcfg_uncond(x, d_cond, d_uncond)
    return damped + scale * (d_cond - damped)
