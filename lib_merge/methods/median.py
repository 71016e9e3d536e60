"""Weiszfeld's geometric median over the rows of a matrix, one pass over the data per iteration.

Each row (one model's whole tensor for a key, flattened) is one point, as in sd-mecha's
``geometric_median`` (after krishnap25/geom_median). Start from the weighted mean and repeat
    βᵢ = wᵢ / max(‖xᵢ − m‖, eps),   m ← Σ βᵢxᵢ / Σ βᵢ
until |Δobjective| ≤ ftol · objective (objective = weighted mean distance) or maxiter updates.

Memory: the rows themselves plus one fp32 vector for m. Distances are accumulated chunk by
chunk (fp64 sums over fixed column chunks), so no N × n difference tensor ever exists; the new
median and the distances to it are computed in the same pass, because the distances that the
stopping test needs after an update are exactly the ones the next update weighs with.

An optional implicit zero point (weight ``zero_weight``) is the base model in task-vector space
(AstolfoMix counts the base as one of the models): it pulls the median towards the base without
storing a row of zeros.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Weiszfeld:
    eps: float = 1e-6
    maxiter: int = 100
    ftol: float = 1e-20


def row_chunk(points: int) -> int:
    """Columns per pass chunk: about 2^18 values in flight whatever the number of rows. A fixed
    function of the row count (never of threads or memory), because the chunking sets the order
    of the fp64 distance sums and therefore the last bits of the result."""
    size = 1 << 18
    while size > 1024 and size * points > 1 << 18:
        size //= 2
    return size


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """Run the block with one intra-op thread: a parallel reduction splits its sum by thread
    count, which would make the result depend on the machine. Engine workers already run
    single-threaded, so this is a no-op there."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def geometric_median_rows(
    points: torch.Tensor,
    weights: torch.Tensor,
    *,
    zero_weight: float = 0.0,
    params: Weiszfeld = Weiszfeld(),
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Geometric median of the rows of ``points`` (P × n, fp32) with non-negative ``weights``
    (P, any float dtype), plus an implicit zero point of weight ``zero_weight``. Returns the
    median (fp32, length n; written into ``out`` if given) and the number of updates made."""
    count, n = points.shape
    w = weights.to(torch.float64)
    median = out if out is not None else torch.empty(n, dtype=torch.float32)
    if n == 0:
        return median, 0
    total = float(w.sum()) + zero_weight
    if total <= 0:
        raise ValueError("geometric median: weights sum to zero")
    with serial_torch():
        dist, zdist = _update(points, w / total, median)
        objective = _objective(w, dist, zero_weight, zdist, total)
        updates = 0
        for _ in range(max(0, params.maxiter)):
            beta = w / dist.clamp(min=params.eps)
            zbeta = zero_weight / max(zdist, params.eps)
            dist, zdist = _update(points, beta / (float(beta.sum()) + zbeta), median)
            updates += 1
            new_objective = _objective(w, dist, zero_weight, zdist, total)
            converged = abs(objective - new_objective) <= params.ftol * new_objective
            objective = new_objective
            if converged:
                break
    return median, updates


def _update(points: torch.Tensor, coef: torch.Tensor, median: torch.Tensor) -> tuple[torch.Tensor, float]:
    """median ← Σ coefᵢ·rowᵢ; returns (‖rowᵢ − median‖ for every row, ‖median‖)."""
    count, n = points.shape
    coef32 = coef.to(torch.float32)
    sq = torch.zeros(count, dtype=torch.float64)
    zsq = 0.0
    size = row_chunk(count)
    scratch = torch.empty(count, min(size, n), dtype=torch.float32)
    for start in range(0, n, size):
        stop = min(n, start + size)
        block = points[:, start:stop]
        m = median[start:stop]
        torch.mv(block.T, coef32, out=m)
        diff = scratch[:, : stop - start]
        torch.sub(block, m, out=diff)
        diff.square_()
        sq += diff.sum(dim=1, dtype=torch.float64)
        zsq += float(m.square().sum(dtype=torch.float64))
    return sq.sqrt_(), math.sqrt(zsq)


def _objective(w: torch.Tensor, dist: torch.Tensor, zero_weight: float, zdist: float, total: float) -> float:
    return (float((w * dist).sum()) + zero_weight * zdist) / total
