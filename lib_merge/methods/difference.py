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
    # three temporaries, updated in place, in the formula's order of operations (so the bits are
    # those of the plain expression: tests/test_method_exactness.py); the inputs are left alone
    delta = b - c
    scale = torch.sub(b, a).abs_()
    scale.div_(delta.abs().add_(scale)).nan_to_num_(nan=0.0)
    return delta.mul_(TRAIN_DIFFERENCE_GAIN * alpha).mul_(scale).add_(a)
