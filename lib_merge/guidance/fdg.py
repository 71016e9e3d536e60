"""Frequency-Decoupled Guidance (Sadat, Vontobel, Salehi, Weber, arXiv 2506.19713).

The guidance is split into a low- and a high-frequency band of a two-level Laplacian pyramid,
each with its own scale: per level ``G_ℓ = P_ℓ(D_c) + (w_ℓ − 1)(P_ℓ(D_c) − P_ℓ(D_u))``, then
``D = U(G_low) + G_high``. Every operator is linear, so (derived) the result is

    D = D_u + w_low·Δ + (w_high − w_low)·H(Δ),   H(y) = y − U(L(y)),  Δ = D_c − D_u

which is what we compute (one pyramid of Δ instead of two). The pyramid is Burt-Adelson's (the
5-tap binomial blur [1, 4, 6, 4, 1]/16 with reflect padding, then every other pixel; up: zero
insertion and the same blur ×4, as OpenCV's pyrDown/pyrUp; maps under 3 pixels replicate). pamparamm's node and the diffusers
guider use kornia's pyramid, whose up-sampler is bilinear; the bands differ slightly, the
closed form above holds for either. Odd sides are padded by replication to even and cropped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TAPS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(y: torch.Tensor) -> torch.Tensor:
    c = y.shape[1]
    taps = _TAPS.to(device=y.device, dtype=y.dtype)
    mode = "reflect" if min(y.shape[-2:]) > 2 else "replicate"
    y = F.pad(y, (2, 2, 2, 2), mode=mode)
    y = F.conv2d(y, taps.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(y, taps.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def low_pass(y: torch.Tensor) -> torch.Tensor:
    """U(L(y)): one pyramid level down and back up, at the size of ``y`` (B, C, H, W)."""
    h, w = y.shape[-2:]
    padded = F.pad(y, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else y
    down = _blur(padded)[..., ::2, ::2]
    up = torch.zeros_like(padded)
    up[..., ::2, ::2] = down
    # Dividing by the blurred sample mask is the ×4 of pyrUp wherever reflect padding applies
    # (the mask blurs to exactly 1/4), and keeps constants exact on maps too small to reflect.
    mask = torch.zeros_like(padded[:1, :1])
    mask[..., ::2, ::2] = 1.0
    return (_blur(up) / _blur(mask))[..., :h, :w]


def high_pass(y: torch.Tensor) -> torch.Tensor:
    """H(y) = y − U(L(y)): the finest Laplacian level."""
    return y - low_pass(y)


def fdg_combine(d_cond: torch.Tensor, d_uncond: torch.Tensor, low_scale: float, high_scale: float) -> torch.Tensor:
    """D = D_u + w_low·Δ + (w_high − w_low)·H(Δ) (FDG arXiv 2506.19713, two-level pyramid, closed form)."""
    delta = d_cond - d_uncond
    guided = d_uncond + low_scale * delta
    if high_scale != low_scale:
        guided = guided + (high_scale - low_scale) * high_pass(delta)
    return guided
