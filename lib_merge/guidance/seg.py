"""Smoothed Energy Guidance (Hong, arXiv 2408.00760): blur the self-attention queries.

A linear blur G of the query map gives (G·Q)Kᵀ = G·(QKᵀ), so blurring queries blurs the attention
logits, which lowers the curvature of the attention energy. σ is in feature pixels of the layer
being blurred; σ = ∞ replaces every query by its spatial mean ("uniform queries"). Finite σ is a
real Gaussian: diffusers once swapped the two branches so any finite σ gave the mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BadParameterError


def gaussian_kernel_size(sigma: float, extent: int) -> int:
    """SEG-SDXL's rule: k = ceil(6σ) + 1 − ceil(6σ) mod 2 (the odd one of ceil(6σ), ceil(6σ)+1),
    clamped to ``extent`` when odd and to ``extent + 1`` when even (arXiv 2408.00760, pipeline_seg.py)."""
    c = math.ceil(6.0 * sigma)
    size = c + 1 - c % 2
    # The reference's clamp, min(k, extent − (extent mod 2 − 1)): an even map takes a kernel one
    # wider than itself, whose reflect padding (extent / 2) still fits inside the map.
    limit = extent if extent % 2 == 1 else extent + 1
    return max(min(size, limit), 1)


def gaussian_kernel_1d(sigma: float, size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised Gaussian sampled at integer offsets −size//2..size//2 (SEG, arXiv 2408.00760, Gaussian query blur)."""
    offsets = torch.arange(size, device=device, dtype=torch.float64) - (size // 2)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).to(dtype)


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    channels, size = x.shape[1], kernel.numel()
    pad = size // 2
    if axis == 3:
        padded = F.pad(x, (pad, pad, 0, 0), mode="reflect")
        weight = kernel.view(1, 1, 1, size)
    else:
        padded = F.pad(x, (0, 0, pad, pad), mode="reflect")
        weight = kernel.view(1, 1, size, 1)
    return F.conv2d(padded, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)


def seg_blur_2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, C, H, W) map with reflect padding; σ = ∞ gives the spatial mean (SEG, arXiv 2408.00760)."""
    if not sigma > 0:
        raise BadParameterError(f"seg_sigma={sigma!r}: must be > 0 (inf = spatial mean)")
    if math.isinf(sigma):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    dtype = x.dtype
    work = x.float()
    for axis in (3, 2):
        size = gaussian_kernel_size(sigma, x.shape[axis])
        if size > 1:
            work = _blur_axis(work, gaussian_kernel_1d(sigma, size, device=x.device), axis)
    return work.to(dtype)


def feature_hw(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """The (h, w) grid of a ``seq_len``-token feature map of a U-Net fed a ``latent_hw`` latent (never assumes square)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h <= 0 or w <= 0:
        raise BadParameterError(f"latent_hw={latent_hw!r}: both sides must be positive")
    # ldm's stride-2 downsampling (kernel 3, padding 1) maps n to ceil(n / 2).
    while h * w > seq_len and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w == seq_len:
        return h, w
    # Some other down-sampling scheme: take the factorisation closest to the latent's aspect ratio.
    aspect = latent_hw[0] / latent_hw[1]
    best = min(
        (d for d in range(1, seq_len + 1) if seq_len % d == 0),
        key=lambda d: abs(math.log(d / (seq_len // d)) - math.log(aspect)),
    )
    return best, seq_len // best


def blur_queries(q: torch.Tensor, hw: tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur (B, h·w, C) queries over their (h, w) grid, each channel alike: SA_σ = softmax((G_σ∗Q)Kᵀ/√d)V (arXiv 2408.00760)."""
    b, n, c = q.shape
    h, w = hw
    if h * w != n:
        raise BadParameterError(f"SEG: a {h}x{w} grid does not hold {n} query tokens")
    grid = q.transpose(1, 2).reshape(b, c, h, w)
    return seg_blur_2d(grid, sigma).reshape(b, c, n).transpose(1, 2)


def seg_term(d_cond: torch.Tensor, d_seg: torch.Tensor, scale: float) -> torch.Tensor:
    """s·(D_c − D_σ,c): the SEG guidance term added to CFG (SEG arXiv 2408.00760 with CFG, diffusers form)."""
    return scale * (d_cond - d_seg)
