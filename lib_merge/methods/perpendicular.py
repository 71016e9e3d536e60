"""sd-mecha's add_perpendicular (ljleb/sd-mecha b8d4d88, `merge_methods/`)."""
from __future__ import annotations

import torch

from .params import ALPHA
from .registry import KeyContext, merge_method


@merge_method("add_perpendicular", inputs=("A", "B", "C"), params=(ALPHA,), reference="https://github.com/ljleb/sd-mecha")
def add_perpendicular(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """A + α·(Δb − ⟨Δa,Δb⟩/‖Δa‖²·Δa), Δa = A − C, Δb = B − C (whole tensor): add only the part of
    B's change that is orthogonal to A's own change from C; Δa = 0 adds Δb whole; NaN → 0."""
    da, db = a - c, b - c
    norm2 = float(torch.dot(da.reshape(-1).double(), da.reshape(-1).double()))
    if norm2 == 0:
        return a + alpha * db
    dot = float(torch.dot(da.reshape(-1).double(), db.reshape(-1).double()))
    perp = torch.nan_to_num(db - (dot / norm2) * da)
    return a + alpha * perp
