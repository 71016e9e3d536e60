"""Guidance in a limited interval (Kynkäänniemi et al., arXiv 2404.07724, NeurIPS 2024).

CFG is applied only for noise levels σ in (σ_lo, σ_hi]; elsewhere the scale is 1, so D = D_c and
nothing needs the uncond. The test is on the σ of the model call, as in the paper, not on the
step index: a step window would move with the schedule and the step count. A low bound of 0 and
a high bound of ∞ leave that side open (reForge's "guidance limiter" writes −1 for that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BadParameterError


@dataclass(frozen=True)
class SigmaInterval:
    """The half-open σ interval (low, high] in which guidance runs."""

    low: float = 0.28
    high: float = 5.42

    def __post_init__(self) -> None:
        if math.isnan(self.low) or math.isnan(self.high) or self.low < 0:
            raise BadParameterError(f"CFG interval ({self.low}, {self.high}]: bounds must be numbers, low >= 0")
        if not self.low < self.high:
            raise BadParameterError(f"CFG interval ({self.low}, {self.high}]: low must be below high")

    def contains(self, sigma) -> bool:
        """Whether the call's σ (a number or a per-image tensor, whose largest value counts) is inside."""
        if torch.is_tensor(sigma):
            sigma = float(sigma.max()) if sigma.numel() else math.nan
        return self.low < float(sigma) <= self.high

    def scale(self, cfg_scale: float, sigma) -> float:
        """w(σ): the CFG scale inside the interval, 1 outside (arXiv 2404.07724 eq. 4)."""
        return cfg_scale if self.contains(sigma) else 1.0
