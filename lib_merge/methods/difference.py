"""Difference-based merges."""
from __future__ import annotations

import torch

from .params import ALPHA
from .registry import KeyContext, merge_method

# supermerger's empirical gain that restores the magnitude lost to the ratio below.
TRAIN_DIFFERENCE_GAIN = 1.8


@merge_method("train_difference", inputs=("A", "B", "C"), params=(ALPHA,), elementwise=True)
def train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """A + 1.8·α·(B − C)·|B − A| / (|B − A| + |B − C|) (supermerger "trainDifference"): add B − C
    as if A had been trained the same way, scaled down where A already is close to B; 0/0 → 0,
    so where B equals C the result is A."""
    delta = b - c
    dist_a = (b - a).abs()
    scale = dist_a / (dist_a + delta.abs())
    scale = torch.nan_to_num(scale, nan=0.0)
    return a + (TRAIN_DIFFERENCE_GAIN * alpha) * delta * scale
