"""Normalized Attention Guidance (Chen, Bandyopadhyay, Zou, Song, arXiv 2505.21179; official code
ChenDarYen/Normalized-Attention-Guidance).

Guidance inside cross-attention, per image token, with the queries Q of the positive branch:
``Z⁺ = Attn(Q, K⁺, V⁺)``, ``Z⁻ = Attn(Q, K⁻, V⁻)`` (keys and values of the NAG negative prompt),
``Z̃ = φ·Z⁺ − (φ − 1)·Z⁻``, ``r = ‖Z̃‖₁/‖Z⁺‖₁`` over the features of each token,
``Ẑ = Z̃·min(r, τ)/r``, output ``α·Ẑ + (1 − α)·Z⁺`` before the output projection ``to_out``.
We use the paper's L1 norm (the official Flux code at 69159ca2 uses L2) and its φ (pamparamm's
``scale s`` is φ − 1). It needs no U-Net rows of its own, so it works at CFG 1 (untitled).

``min(r, τ)/r`` is computed as ``min(1, τ·‖Z⁺‖₁/‖Z̃‖₁)``: a zero Z⁺ (all-zero conditioning:
bias-free ``to_k``/``to_v`` give zero keys and values) then returns Z⁺ instead of 0/0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V per head for (B, N, heads·d) projections; returns (B, N, heads·d) before ``to_out``."""
    b, n, inner = q.shape
    split = [t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, n, inner)


def nag_attention(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """α·Ẑ + (1 − α)·Z⁺ with Ẑ the L1-normalised extrapolation φZ⁺ − (φ − 1)Z⁻ (NAG arXiv 2505.21179 eqs. 6-8)."""
    dtype = z_pos.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    pos, neg = z_pos.to(work), z_neg.to(work)
    extrapolated = pos + (scale - 1.0) * (pos - neg)
    n_pos = pos.abs().sum(dim=-1, keepdim=True)
    n_ext = extrapolated.abs().sum(dim=-1, keepdim=True)
    factor = torch.where(n_ext > 0, (tau * n_pos / n_ext.clamp_min(torch.finfo(n_ext.dtype).tiny)).clamp(max=1.0), 1.0)
    return (alpha * extrapolated * factor + (1.0 - alpha) * pos).to(dtype)
