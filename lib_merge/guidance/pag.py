"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377).

In the chosen self-attention layers the attention map is replaced by the identity, so each
token attends only to itself: softmax(QKᵀ/√d)·V becomes V, and the layer's output projection is
applied as usual (the paper, diffusers, ComfyUI and Forge; incantations skips ``to_out``).
"""
from __future__ import annotations

import torch
from torch import nn


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    """Identity self-attention: softmax(QKᵀ/√d)·V → V (PAG arXiv 2403.17377); fits Forge's ``attn1_replace``."""
    # With ControlNet reference-only, K/V carry extra reference tokens after the real ones.
    return v[:, : q.shape[1]]


def apply_out_projection(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Run an attention module's output projection (ldm ``to_out`` Sequential or diffusers ModuleList)."""
    to_out = attn.to_out
    if isinstance(to_out, nn.ModuleList) and not isinstance(to_out, nn.Sequential):
        for layer in to_out:
            h = layer(h)
        return h
    return to_out(h)


def perturbed_self_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PAG layer output to_out(V) with V = to_v(x) for a self-attention module (PAG arXiv 2403.17377)."""
    return apply_out_projection(attn, attn.to_v(x))


def pag_term(d_cond: torch.Tensor, d_pag: torch.Tensor, scale: float) -> torch.Tensor:
    """s·(D_c − D̂_c): the PAG guidance term added to CFG (PAG arXiv 2403.17377, diffusers PAGMixin form)."""
    return scale * (d_cond - d_pag)
