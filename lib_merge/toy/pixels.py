"""Pixel statistics of samples that guidance at high scale is known to push: colour saturation
and the share of clipped channel values (APG's claim is that it avoids CFG's oversaturation)."""
from __future__ import annotations

import torch


def saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation (max − min)/max over pixels of uint8 (N, 3, H, W) images."""
    x = images.float() / 255.0
    hi, lo = x.max(dim=1).values, x.min(dim=1).values
    return float(torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi)).mean())


def clipped_share(images: torch.Tensor) -> float:
    """Share of channel values at 0 or 255: where the sampler's x₀ left [−1, 1] and was clipped."""
    return float(((images == 0) | (images == 255)).float().mean())
