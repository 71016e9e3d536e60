"""Weiszfeld's geometric median over the rows of a matrix, iterated in the rows' span.

Each row (one model's whole tensor for a key, flattened) is one point, as in sd-mecha's
``geometric_median`` (after krishnap25/geom_median). Start from the weighted mean and repeat
    βᵢ = wᵢ / max(‖xᵢ − m‖, eps),   m ← Σ βᵢxᵢ / Σ βᵢ
until |Δobjective| ≤ ftol · objective (objective = weighted mean distance) or maxiter updates.

Every iterate is a combination m = Σ cⱼxⱼ of the rows, so the distances need only the rows' Gram
matrix G: ‖xᵢ − m‖² = Gᵢᵢ − 2(Gc)ᵢ + cᵀGc. One pass over the data builds G (fp64 sums of the exact
fp32 products, over fixed column chunks); the iterations then cost O(P²) each, whatever the
tensor's size; a last pass writes m. The data are read twice however many updates the median
needs (the previous form read them once per update: 7–100 passes). The coefficients are exact in
fp64 until that last pass, where the fp32 rows are combined once.

An optional implicit zero point (weight ``zero_weight``) is the base model in task-vector space
(AstolfoMix counts the base as one of the models): it pulls the median towards the base without
storing a row of zeros; its distance is ‖m‖ = √(cᵀGc).
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
        gram = gram_matrix(points)
        coef = w / total
        dist, zdist = _distances(gram, coef)
        objective = _objective(w, dist, zero_weight, zdist, total)
        updates = 0
        for _ in range(max(0, params.maxiter)):
            beta = w / dist.clamp(min=params.eps)
            zbeta = zero_weight / max(zdist, params.eps)
            coef = beta / (float(beta.sum()) + zbeta)
            dist, zdist = _distances(gram, coef)
            updates += 1
            new_objective = _objective(w, dist, zero_weight, zdist, total)
            converged = abs(objective - new_objective) <= params.ftol * new_objective
            objective = new_objective
            if converged:
                break
        _combine(points, coef, median)
    return median, updates


def gram_matrix(points: torch.Tensor) -> torch.Tensor:
    """G = X·Xᵀ in fp64 over fixed column chunks (the chunking, not the thread count, sets the
    order of the sums: see ``row_chunk``); the fp32 → fp64 products are exact. Model Stock's
    cosines use it too."""
    count, n = points.shape
    gram = torch.zeros(count, count, dtype=torch.float64)
    size = row_chunk(count)
    for start in range(0, n, size):
        block = points[:, start: min(n, start + size)].to(torch.float64)
        gram += block @ block.T
    return gram


def _distances(gram: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(‖rowᵢ − Σ coefⱼ·rowⱼ‖ for every row, ‖Σ coefⱼ·rowⱼ‖) from the Gram matrix."""
    g_coef = gram @ coef
    norm2 = float(coef @ g_coef)
    dist2 = gram.diagonal() - 2 * g_coef + norm2
    return dist2.clamp_(min=0.0).sqrt_(), math.sqrt(max(norm2, 0.0))


def _combine(points: torch.Tensor, coef: torch.Tensor, median: torch.Tensor) -> None:
    """median ← Σ coefᵢ·rowᵢ (fp32), chunk by chunk."""
    count, n = points.shape
    coef32 = coef.to(torch.float32)
    size = row_chunk(count)
    for start in range(0, n, size):
        stop = min(n, start + size)
        torch.mv(points[:, start:stop].T, coef32, out=median[start:stop])


def _objective(w: torch.Tensor, dist: torch.Tensor, zero_weight: float, zdist: float, total: float) -> float:
    return (float((w * dist).sum()) + zero_weight * zdist) / total
