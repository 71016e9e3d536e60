"""Parameters shared by several methods, so their meaning is stated once."""
from __future__ import annotations

from .registry import Param

ALPHA = Param(
    "alpha",
    float,
    0.5,
    "B's share: 0 gives A, 1 gives B (per block with --weights); values outside [0, 1] extrapolate",
    per_block=True,
)
BETA = Param("beta", float, 0.5, "second ratio (C's share, or the outer ratio of a two-level method)", per_block=True)
