"""The task-vector core shared by task arithmetic, TIES, DARE, DELLA, breadcrumbs, Model Stock,
the geometric median and the AstolfoMix pipelines.

Roles: model A is the base; every further model (B, C, …) is a fine-tune with task vector
Δᵢ = θᵢ − A. Per key the core runs
    1. Δᵢ = θᵢ − A                     (fp32)
    2. drop   (DARE / DELLA, random)   then trim (TIES top-k / breadcrumbs band)
    3. elect a sign per element        (vote = sum: sign Σ wᵢΔᵢ, count: sign Σ sign Δᵢ)
       and zero every entry that disagrees; a tie elects 0, so every non-zero entry is zeroed
    4. combine into τ                  (sum Σ wᵢΔᵢ | disjoint mean | Model Stock | geometric median)
    5. result = A + α·τ                (α per block)
A method is a configuration of this pipeline (``TaskVectorConfig``). Methods whose steps are all
elementwise (task_arithmetic, dare, ties_soup) are streamed by the engine chunk by chunk; the
others need each fine-tune's whole tensor for a key (ranks, thresholds, cosines, the median)
and hold a P × n fp32 matrix of task vectors — see ``working_copies``.

Inputs may be tensors or engine handles with a ``load()`` method (a lazily mapped tensor), so
the engine can hand over N inputs while only one is mapped at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import BadParameterError
from .median import Weiszfeld, geometric_median_rows, gram_matrix, row_chunk, serial_torch
from .registry import KeyContext
from .workspace import empty_large
from .sparsify import (TopSelection, band_trim, chunk_offset, chunks, dare_drop_, della_drop_, high_histogram,
                       new_high_histogram, top_trim)


@dataclass(frozen=True)
class TaskVectorConfig:
    drop: str = "none"  # none | dare | della
    p: float = 0.0  # drop rate
    della_eps: float = 0.0
    rescale: bool = False
    trim: str = "none"  # none | top | band
    k: float = 1.0  # kept fraction
    gamma: float = 0.0  # breadcrumbs: largest fraction removed
    vote: str = "none"  # none | sum | count
    combine: str = "sum"  # sum | mean (disjoint, needs a vote) | stock | median
    include_base: bool = False  # median: the base counts as one zero task vector
    median: Weiszfeld = Weiszfeld()
    cos_eps: float = 1e-6


def difference(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None,
               histogram: torch.Tensor | None = None) -> torch.Tensor:
    """x − base into ``out`` or a new flat tensor (fp32, or wider when an input is), converted
    chunk by chunk so that no whole-tensor converted copy of either input is made. With
    ``histogram`` the high bits of |x − base| are counted into it as each chunk is made, while it
    is still in cache (the first pass of ``select_top``)."""
    flat_x, flat_b = x.reshape(-1), base.reshape(-1)
    if out is None:
        out = torch.empty(flat_x.numel(), dtype=torch.promote_types(torch.promote_types(x.dtype, base.dtype), torch.float32))
    for part in chunks(out.numel()):
        out[part].copy_(flat_x[part]).sub_(flat_b[part])
        if histogram is not None:
            high_histogram(out, into=histogram, part=part)
    return out


def load(x: Any) -> torch.Tensor:
    """A tensor, or an engine handle's tensor (mapped only while the caller holds it)."""
    return x.load() if hasattr(x, "load") else x


def parse_task_weights(text: str, count: int, method: str, *, non_negative: bool) -> torch.Tensor:
    if not str(text).strip():
        return torch.ones(count, dtype=torch.float64)
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise BadParameterError(f"{method}: task_weights={text!r} must be comma-separated numbers") from None
    if len(values) != count:
        raise BadParameterError(
            f"{method}: task_weights has {len(values)} values for {count} fine-tunes (models B, C, …); give one each"
        )
    if not all(math.isfinite(v) for v in values):
        raise BadParameterError(f"{method}: task_weights={text!r} must be finite numbers")
    if non_negative and any(v < 0 for v in values):
        raise BadParameterError(f"{method}: task_weights={text!r} must be ≥ 0 when signs are elected")
    return torch.tensor(values, dtype=torch.float64)


# Values per column block of the fused pass. Every torch call hands the GIL to the other worker
# and takes it back (a futex call each way), so blocks are large: 2^19 values (2 MiB per fp32
# block, a few blocks of temporaries — in L3, not L2) took less wall time on 2 workers than
# 2^17, which was faster for one thread alone.
COLUMNS = 1 << 19

# Temporaries of the chunked passes, whatever the size of the key: a handful of P × COLUMNS/P
# fp32 blocks (2 MiB each), or one DELLA chunk (WIDE_CHUNK ranks in fp64 and fp32, its draws and
# its clamped q: 20 MiB). The glibc slack that comes with DELLA's big buffers is declared with
# them, in ``working_copies``.
SCRATCH_BYTES = 32 << 20


def working_copies(config: TaskVectorConfig, points: int) -> float:
    """Peak fp32 copies of one key's tensor that the whole-tensor path holds for P task vectors,
    besides the base and one fine-tune mapped in their storage dtype (the engine adds those):
    the P × n matrix, plus the result (or the median) — or, while DELLA ranks one row, the sort's
    buffers (6 copies: |Δ| as int32 keys, int64 order, the sort's scratch) and 2 more for what
    glibc's default allocator keeps resident of them between rows (with the tests' 2 M-element
    key DGMLA grew by 95 MB with every block mmapped, by 87–119 MB run to run by default; 6
    copies declared 114 MB and failed CI once). Chunk temporaries come on top: ``SCRATCH_BYTES``."""
    extra = 1
    if config.drop == "della":
        extra = 8
    return points + extra


# -- the whole-tensor path -----------------------------------------------------------------------
def merge_task_vectors(
    base: Any, models: Sequence[Any], *, ctx: KeyContext, config: TaskVectorConfig, alpha: float, weights: torch.Tensor
) -> torch.Tensor:
    """A + α·τ for one key (fp32, A's shape); see the module doc for the steps."""
    with serial_torch():
        return _merge(base, models, ctx, config, alpha, weights)


def _merge(base: Any, models: Sequence[Any], ctx: KeyContext, config: TaskVectorConfig, alpha: float, weights: torch.Tensor) -> torch.Tensor:
    a = load(base)
    shape = tuple(a.shape)
    n = a.numel()
    count = len(models)
    deltas = empty_large(count, n)
    flat_a = a.reshape(-1)
    trims = []
    for i, source in enumerate(models):
        t = load(source).reshape(-1)
        if t.numel() != n:
            raise BadParameterError(f"{ctx.key}: model {i + 1} has {t.numel()} elements, A has {n}")
        # a top-k trim straight after the difference counts its first histogram on the way
        histogram = new_high_histogram() if config.trim == "top" and config.drop == "none" else None
        row = difference(t, flat_a, out=deltas[i], histogram=histogram)
        del t  # unmaps the fine-tune before the next one is read
        trims.append(_sparsify_(row, ctx, i + 1, config, histogram))
    # Trim masks, election, combination and A + α·τ are per column: one pass over column blocks,
    # each while it is in cache. Their results do not depend on the block width, so the widths
    # are the fastest measured (2^16 columns at P = 2), not row_chunk's, which orders the sums of
    # the median and Model Stock.
    across = max(1 << 12, COLUMNS // count)
    if config.combine not in ("median", "stock"):
        # τ overwrites the first task vector column block by column block, after the block is
        # combined: no further n-sized buffer (and no page faults for one)
        tau = deltas[0]
        for part in chunks(n, across):
            block = deltas[:, part]
            _trim_(block, deltas, trims, part)
            agree = _elect_(block, weights, config.vote) if config.vote != "none" else None
            out = tau[part]
            out.copy_(_combine(block, weights, config, agree))
            out.mul_(alpha).add_(flat_a[part])
        return tau.view(shape)
    if config.vote != "none" or any(trim is not None for trim in trims):
        for part in chunks(n, across):
            block = deltas[:, part]
            _trim_(block, deltas, trims, part)
            if config.vote != "none":
                _elect_(block, weights, config.vote)
    if config.combine == "median":
        zero = 1.0 if config.include_base else 0.0
        tau, _ = geometric_median_rows(deltas, weights, zero_weight=zero, params=config.median)
    else:
        tau = _model_stock(deltas, config.cos_eps)
    del deltas
    for part in chunks(n):
        tau[part].mul_(alpha).add_(flat_a[part])
    return tau.view(shape)


def _sparsify_(row: torch.Tensor, ctx: KeyContext, model_index: int, config: TaskVectorConfig,
               histogram: torch.Tensor | None = None):
    """The drop, in place; returns the trim's selection (applied later by ``_trim_``) or None.
    ``histogram``: the row's high-bit counts, when the caller made them (see ``difference``)."""
    if config.drop == "dare":
        for part in chunks(row.numel()):
            dare_drop_(row[part], ctx=ctx, model_index=model_index, p=config.p, rescale=config.rescale, offset=part.start)
    elif config.drop == "della":
        della_drop_(row, ctx=ctx, model_index=model_index, p=config.p, eps=config.della_eps, rescale=config.rescale)
    if config.trim == "top":
        return top_trim(row, config.k, histogram)
    if config.trim == "band":
        return band_trim(row, config.k, config.gamma)
    return None


def _trim_(block: torch.Tensor, deltas: torch.Tensor, trims: list, part: slice) -> None:
    """Zero the trimmed entries of a P × C column block (rows' selections from ``_sparsify_``)."""
    for i, trim in enumerate(trims):
        if isinstance(trim, TopSelection):
            trim.apply_(deltas[i], part)
        elif trim is not None:
            block[i].mul_(trim.mask(deltas[i], part))


# The election and the disjoint mean below use only arithmetic: on CPU a bool mask (a comparison,
# then a multiply by it) costs about ten times an arithmetic pass, and these run on every column.
def _elect_(block: torch.Tensor, weights: torch.Tensor, vote: str) -> torch.Tensor:
    """Zero, in place, every entry whose sign differs from the elected one (P × C block); a zero
    vote zeroes the column. Returns the agreement (1.0 where an entry was kept and is non-zero,
    else 0.0), which is ``block != 0`` afterwards, for the disjoint mean's counts."""
    signs = torch.sign(block)
    if vote == "count":
        tally = signs.sum(dim=0)
    else:
        tally = torch.matmul(weights.to(torch.float32), block)
    agree = signs.mul_(torch.sign(tally)).clamp_(min=0.0)  # sᵢ·s = 1 iff the signs agree and are not 0
    block.mul_(agree)
    return agree


def _combine(block: torch.Tensor, weights: torch.Tensor, config: TaskVectorConfig, agree: torch.Tensor | None = None) -> torch.Tensor:
    """Σ wᵢΔᵢ per column, or (combine = mean) the disjoint mean Σ wᵢΔᵢ / Σ_{Δᵢ≠0} wᵢ, 0 where no
    model kept a value. ``agree`` is ``block != 0`` as 1.0/0.0 when the caller has it."""
    w = weights.to(torch.float32)
    total = torch.matmul(w, block)
    if config.combine != "mean":
        return total
    if agree is None:
        agree = torch.sign(block).abs_()
    present = torch.matmul(w, agree)
    # Where nobody kept a value the total is ±0 (weights are finite): + 0.0 makes it +0, and
    # +0 / tiny stays 0 — the value torch.where(present > 0, total / present, 0) gives.
    return total.add_(0.0).div_(present.clamp_(min=torch.finfo(torch.float32).tiny))


def _model_stock(deltas: torch.Tensor, cos_eps: float) -> torch.Tensor:
    """t·mean(Δᵢ), t = P·cosθ/(1 + (P−1)·cosθ), cosθ the mean cosine over all pairs of task
    vectors (whole tensors), clamped to [0, 1]."""
    count, n = deltas.shape
    across = row_chunk(count)
    gram = gram_matrix(deltas)
    norms = gram.diagonal().sqrt()
    pairs = [
        float(gram[i, j] / max(float(norms[i] * norms[j]), cos_eps))
        for i in range(count) for j in range(i + 1, count)
    ]
    cos = min(1.0, max(0.0, sum(pairs) / len(pairs))) if pairs else 1.0
    t = count * cos / (1 + (count - 1) * cos)
    tau = torch.empty(n, dtype=torch.float32)
    for part in chunks(n, across):
        tau[part] = deltas[:, part].sum(dim=0).mul_(t / count)
    return tau


# -- the chunk path (elementwise configurations) -------------------------------------------------
def merge_chunk(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, ctx: KeyContext, config: TaskVectorConfig, alpha: float, weights: torch.Tensor
) -> torch.Tensor:
    """The same pipeline on matching flat (or whole) chunks, for configurations with no
    whole-tensor step; ``ctx.offset`` places the chunk for the random draws."""
    offset = chunk_offset(ctx)
    block = torch.stack([m.reshape(-1) for m in models]).sub_(base.reshape(-1))
    if config.drop == "dare":
        draws = torch.empty(block.shape[1], dtype=torch.float32)
        for i in range(block.shape[0]):
            dare_drop_(block[i], ctx=ctx, model_index=i + 1, p=config.p, rescale=config.rescale, offset=offset, draws=draws)
        del draws
    agree = _elect_(block, weights, config.vote) if config.vote != "none" else None
    tau = _combine(block, weights, config, agree)
    return tau.mul_(alpha).add_(base.reshape(-1)).view(base.shape)


def is_elementwise(config: TaskVectorConfig) -> bool:
    return config.drop in ("none", "dare") and config.trim == "none" and config.combine in ("sum", "mean")


def task_chunk_copies(count: int) -> int:
    """fp32 chunk buffers the chunk path (``merge_chunk``) holds at its peak for ``count`` inputs:
    the engine's input and output chunks, the P × C stack, the drop's draws and masks, the signs
    and tallies of the election, the disjoint mean's counts — 12.5 chunks live at 3 inputs in
    the strict measurement of tests/test_many_memory.py — plus what glibc's default allocator
    keeps resident of the freed ones: chunk buffers fall below its dynamic mmap threshold and
    come from a heap that fragments (DARE's per-block generators, small allocations between
    them, are the likely cause; not verified), and with default settings DARE peaked at 21–23.6
    chunks in some runs and 15.6 in others (6P + 4 = 22 failed CI once)."""
    return 8 * count + 4


def chunk_copies(copies: Callable[[int], int]) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Declare an elementwise method's peak chunk buffers for N inputs (the planner's default
    counts a plain weighted sum's)."""

    def mark(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        fn.chunk_copies = copies  # type: ignore[attr-defined]
        return fn

    return mark


def lazy_inputs(copies: Callable[[int], float]) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Mark a method as taking engine handles (``load()``) and declare its peak working set in
    fp32 copies of the key's tensor for N input models; the engine uses both to bound memory."""

    def mark(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        fn.lazy_inputs = True  # type: ignore[attr-defined]
        fn.working_copies = copies  # type: ignore[attr-defined]
        return fn

    return mark
