"""sd-mecha's add_perpendicular (ljleb/sd-mecha b8d4d88, `merge_methods/`), streamed.

Two whole-tensor reductions (‖Δa‖², ⟨Δa,Δb⟩) come before any output element is known, so Δa and
Δb are held in fp32 while the inputs are mapped two at a time (C with A, then C with B). The
reductions are summed in fp64 chunk by chunk (fp32 products are exact in fp64; only the summation
order can differ from a whole-tensor fp64 dot, and their ratio is rounded to fp32 before use), and
the output is written chunk by chunk into Δa's buffer with exactly the formula's operations.
"""
from __future__ import annotations

import torch

from .median import serial_torch
from .params import ALPHA
from .registry import KeyContext, merge_method
from .sparsify import chunks
from .task_vector import difference, lazy_inputs, load


def _dots(da: torch.Tensor, db: torch.Tensor) -> tuple[float, float]:
    """(⟨Δa,Δa⟩, ⟨Δa,Δb⟩) in fp64, chunk by chunk in a fixed order."""
    norm2 = dot = 0.0
    for part in chunks(da.numel()):
        x, y = da[part].double(), db[part].double()
        norm2 += float(torch.dot(x, x))
        dot += float(torch.dot(x, y))
    return norm2, dot


@merge_method("add_perpendicular", inputs=("A", "B", "C"), params=(ALPHA,), reference="https://github.com/ljleb/sd-mecha")
@lazy_inputs(lambda n: 2)  # Δa (which becomes the result) and Δb in fp32; two inputs mapped at a time
def add_perpendicular(a, b, c, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """A + α·(Δb − ⟨Δa,Δb⟩/‖Δa‖²·Δa), Δa = A − C, Δb = B − C (whole tensor): add only the part of
    B's change that is orthogonal to A's own change from C; Δa = 0 adds Δb whole; NaN → 0."""
    with serial_torch():
        base = load(c)
        shape = base.shape
        da = difference(load(a), base)
        db = difference(load(b), base)
        del base  # unmaps C
        norm2, dot = _dots(da, db)
        flat_a = load(a).reshape(-1)
        spare = torch.empty(min(da.numel(), 1 << 18), dtype=da.dtype)
        for part in chunks(da.numel()):
            x = spare[: part.stop - part.start]
            if norm2 == 0:
                torch.mul(db[part], alpha, out=x)  # α·Δb
            else:
                # nan_to_num(Δb − (dot/norm2)·Δa)·α, one rounding per step as in the whole-tensor form
                torch.mul(da[part], dot / norm2, out=x)
                torch.sub(db[part], x, out=x)
                torch.nan_to_num(x, out=x).mul_(alpha)
            da[part].copy_(flat_a[part]).add_(x)  # A + …
        return da.view(shape)


add_perpendicular.working_set = "Δa (then the result) and Δb; two inputs mapped at a time"  # type: ignore[attr-defined]
