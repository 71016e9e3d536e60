"""Spherical interpolation of whole tensors, streamed.

A slerp needs three whole-tensor reductions (‖a‖, ‖b‖, a·b) before any output element is known,
then it is elementwise. So it runs in two passes over the inputs as they are stored (fp16 is read
straight from the mapped file): the reductions in fp64 over fp32 chunks — fp32 products are exact
in fp64, so only the summation order differs from a whole-tensor fp64 reduction — and then the
output, chunk by chunk in fp32 with exactly the whole-tensor formula's operations. The working set
is the fp32 result plus two chunks, instead of fp32 and fp64 copies of every input.
"""
from __future__ import annotations

import math

import torch

from .params import ALPHA, BETA
from .registry import KeyContext, merge_method
from .task_vector import lazy_inputs, load

# Above this |cos θ| the arc is numerically a line (sin θ ≈ 0): interpolate linearly instead.
PARALLEL_DOT = 0.9995
# Elements per chunk: the fp64 copies of two chunks (1 MiB) stay in cache.
SLERP_CHUNK = 1 << 16


def _chunks(n: int):
    for start in range(0, n, SLERP_CHUNK):
        yield slice(start, min(n, start + SLERP_CHUNK))


def _reduce(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(Σa², Σb², Σab) in fp64, summed chunk by chunk in a fixed order (never by thread count)."""
    saa = sbb = sab = 0.0
    for part in _chunks(a.numel()):
        x = a[part].to(torch.float64)
        y = b[part].to(torch.float64)
        saa += float(torch.dot(x, x))
        sbb += float(torch.dot(y, y))
        sab += float(torch.dot(x, y))
    return saa, sbb, sab


def _weights(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float, float, float, float] | None:
    """(‖a‖, ‖b‖, w_a, w_b, lerped norm), or None where the arc degenerates to a line."""
    saa, sbb, sab = _reduce(a, b)
    if saa == 0 or sbb == 0:
        return None
    na, nb = math.sqrt(saa), math.sqrt(sbb)
    dot = sab / na / nb
    if not math.isnan(dot):  # NaN/Inf inputs give a NaN result, which the engine reports
        dot = min(1.0, max(-1.0, dot))
    if abs(dot) > PARALLEL_DOT:
        return None
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    wa = math.sin((1.0 - t) * theta) / sin_theta
    wb = math.sin(t * theta) / sin_theta
    return na, nb, wa, wb, (1.0 - t) * na + t * nb


def slerp_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp of the directions of flat ``a`` and ``b`` (any float dtype) over the whole tensor,
    scaled by the lerped norm (Shoemake 1985; norm handling as sd-mecha), written into the flat
    fp32 ``out`` (which may be ``a`` or ``b`` itself); lerp when (anti)parallel or a norm is 0."""
    scalars = _weights(a, b, t)
    spare = torch.empty(min(SLERP_CHUNK, a.numel()), dtype=torch.float32)
    for part in _chunks(a.numel()):
        x = spare[: part.stop - part.start]
        y = out[part]
        x.copy_(a[part])
        if scalars is None:
            y.copy_(b[part])
            torch.lerp(x, y, t, out=y)
            continue
        na, nb, wa, wb, norm = scalars
        # the whole-tensor formula ((a/‖a‖)·w_a + (b/‖b‖)·w_b)·norm, one fp32 rounding per step
        x.div_(na).mul_(wa)
        y.copy_(b[part])
        y.div_(nb).mul_(wb)
        torch.add(x, y, out=y)
        y.mul_(norm)
    return out


def slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """:func:`slerp_into` a new fp32 tensor of ``a``'s shape."""
    out = torch.empty(a.numel(), dtype=torch.float32)
    return slerp_into(out, a.reshape(-1), b.reshape(-1), t).view(a.shape)


@merge_method("slerp", inputs=("A", "B"), params=(ALPHA,))
@lazy_inputs(lambda n: 1)  # the fp32 result; A and B stay mapped in their storage dtype
def slerp(a, b, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """Spherical interpolation of each whole tensor from A (α = 0) to B (α = 1); norms are
    interpolated linearly; falls back to lerp when A and B are (anti)parallel (|cos| > 0.9995)."""
    return slerp_tensors(load(a), load(b), alpha)


slerp.working_set = "the result; A and B mapped, read in chunks"  # type: ignore[attr-defined]


@merge_method("bislerp", inputs=("A", "B", "C", "D"), params=(ALPHA, BETA))
@lazy_inputs(lambda n: 2)  # the two inner slerps in fp32; two inputs mapped at a time
def bislerp(a, b, c, d, *, ctx: KeyContext, alpha: float, beta: float) -> torch.Tensor:
    """Bilinear slerp over a 2×2 grid (our definition): slerp(slerp(A, B, α), slerp(C, D, α), β);
    corners (α, β) = (0,0) A, (1,0) B, (0,1) C, (1,1) D."""
    first = load(a)
    shape = first.shape
    ab = slerp_tensors(first, load(b), alpha).reshape(-1)
    del first  # unmaps A (and B above) before C and D are read
    cd = slerp_tensors(load(c), load(d), alpha).reshape(-1)
    return slerp_into(ab, ab, cd, beta).view(shape)


bislerp.working_set = "the two inner slerps; two inputs mapped at a time"  # type: ignore[attr-defined]
