"""Sparsification of task vectors: random drops (DARE, DELLA's rank-aware keep probabilities),
magnitude trims (TIES top-k, breadcrumbs' band) — the "optional trim" step of the task-vector core.

Randomness is a pure function of (recipe seed, key, model index, element index): element j of
a key draws its uniform from block j // RNG_BLOCK, whose generator is seeded by
hash(seed, key, "keep/<model>#<block>"). So a mask never depends on thread order, on how the
engine chunks the tensor, or on which other models are in the merge.

Ranks follow sd-mecha (scipy ``rankdata(method="ordinal")``): over the whole tensor, ascending
|Δ|, ties broken by flat position (the earlier element ranks lower). Non-negative float32 values
order exactly like their int32 bit patterns, which lets us sort integers (radix sort, 4× faster
than torch's float sort here) and select thresholds with two 16-bit histograms instead of a sort.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

from .registry import KeyContext
from .workspace import empty_large

RNG_BLOCK = 1 << 16
SMALL_SELECT = 1 << 16  # below this many elements a top-m selection sorts instead of histogramming
# Column chunk for whole-tensor passes: small enough that temporaries stay in cache.
PASS_CHUNK = 1 << 18
# Chunk for passes whose results do not depend on it and whose temporaries may live in L3: each
# torch call hands the GIL to the other worker and takes it back (a futex call each way), so with
# two workers fewer, longer calls win over cache-sized ones.
WIDE_CHUNK = 1 << 20


@dataclass(frozen=True)
class ChunkContext(KeyContext):
    """A KeyContext for one flat chunk of a key: ``offset`` is the chunk's first element index,
    so random methods draw exactly the numbers the whole-tensor call would draw there."""

    offset: int = 0


def chunk_offset(ctx: KeyContext) -> int:
    return int(getattr(ctx, "offset", 0))


def uniforms(ctx: KeyContext, salt: str, offset: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) float32 draws for elements ``offset … offset+n-1`` of ``ctx.key`` (see module doc),
    into ``out`` (n float32) when given.

    Only the prefix of a block that is needed is generated: torch's CPU generator fills a tensor
    serially, so ``rand(k)`` is the first k values of ``rand(RNG_BLOCK)`` (a test checks it)."""
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    pos = offset
    end = offset + n
    while pos < end:
        block = pos // RNG_BLOCK
        start = block * RNG_BLOCK
        stop = min(end, start + RNG_BLOCK)
        generator = ctx.generator(f"{salt}#{block}")
        if pos == start:  # the block's first draws: straight into place
            torch.rand(stop - start, generator=generator, dtype=torch.float32, out=out[pos - offset: stop - offset])
        else:
            draws = torch.rand(stop - start, generator=generator, dtype=torch.float32)
            out[pos - offset: stop - offset] = draws[pos - start:]
        pos = stop
    return out


def keep_salt(model_index: int) -> str:
    return f"keep/{model_index}"


def chunks(n: int, size: int = PASS_CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# -- random drops ------------------------------------------------------------------------------
def dare_drop_(delta: torch.Tensor, *, ctx: KeyContext, model_index: int, p: float, rescale: bool, offset: int = 0,
               draws: torch.Tensor | None = None) -> torch.Tensor:
    """DARE in place on a flat fp32 chunk: keep each entry with probability q = 1 − p (u < q),
    divide the kept ones by q when ``rescale``. p = 1 drops everything. ``draws``: a float32
    buffer of the chunk's size to reuse for the uniforms (one per chunk for all fine-tunes: fewer
    allocations, and less of the heap left fragmented by them)."""
    q = 1.0 - p
    if q >= 1.0:
        return delta
    if q <= 0.0:
        return delta.zero_()
    delta.mul_(below(uniforms(ctx, keep_salt(model_index), offset, delta.numel(), out=draws), q))
    if rescale:
        delta.div_(q)
    return delta


def della_keep_probabilities(row: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """q_j = (1 − p) + ε·(r_j/n − (n+1)/(2n)), clamped to [0, 1], r_j the ordinal rank of |Δ_j|
    over the whole tensor (sd-mecha's window of ±ε/2 around 1 − p). Returns a new float32
    tensor; peak extra memory ≈ 6 fp32 copies of the row (the radix sort's buffers)."""
    n = row.numel()
    # huge pages: the scatter below writes all over both buffers, and with 4 KiB pages most of
    # its time went to TLB misses and first-touch faults
    keys = torch.abs(row, out=empty_large(n))  # later reused to hold q
    bits = keys.view(torch.int32)  # |x| ≥ 0: its bit pattern orders like its value
    order = empty_large(n, dtype=torch.int64)
    torch.sort(bits, stable=True, out=(bits, order))
    q = keys  # the sorted keys are no longer needed; the buffer now receives q in element order
    for part in chunks(n, WIDE_CHUNK):
        # in place: the same fp64 operations as (r / n − (n+1)/2n)·ε + (1 − p), one fp64 chunk
        # of scratch instead of three (the chunk is wide; see WIDE_CHUNK)
        values = torch.arange(part.start + 1, part.stop + 1, dtype=torch.float64)
        values.div_(n).sub_((n + 1) / (2 * n)).mul_(eps).add_(1.0 - p).clamp_(0.0, 1.0)
        # order is a permutation: index_copy_ scatters without advanced indexing's overhead (2× faster)
        q.index_copy_(0, order[part], values.to(torch.float32))
    del order
    return q


def della_drop_(row: torch.Tensor, *, ctx: KeyContext, model_index: int, p: float, eps: float, rescale: bool) -> torch.Tensor:
    """DELLA (MagPrune) in place on a whole flat fp32 task vector: keep entry j with probability
    q_j (see :func:`della_keep_probabilities`); with ``rescale`` divide each kept entry by its own
    q_j, as the DELLA paper does (sd-mecha divides by 1 − p, mergekit matches the L1 norm)."""
    n = row.numel()
    if n == 0:
        return row
    q = della_keep_probabilities(row, p, eps)
    salt = keep_salt(model_index)
    for part in chunks(n, WIDE_CHUNK):
        qs = q[part]
        seg = row[part]
        seg.mul_(below(uniforms(ctx, salt, part.start, part.stop - part.start), qs))
        if rescale:
            # a dropped entry is ±0 already and stays so divided by any q > 0; q = 0 (never
            # kept) becomes the smallest subnormal so that 0/q is not NaN — kept entries have
            # q > u ≥ 0 and are divided by their own q unchanged
            seg.div_(qs.clamp(min=_SMALLEST))
    return row


_SMALLEST = float(torch.finfo(torch.float32).smallest_normal) * 2.0 ** -23  # 2^-149, the least subnormal


def below(u: torch.Tensor, q: torch.Tensor | float) -> torch.Tensor:
    """1.0 where u < q, else 0.0, as an fp32 tensor of u's shape (in place of u). For floats,
    q − u > 0 exactly when u < q (a difference of two distinct floats never rounds to zero), so
    sign(q − u) clamped at 0 is the comparison in two arithmetic passes: on CPU a bool
    comparison and the multiply by it cost several times that."""
    return u.neg_().add_(q).sign_().clamp_(min=0.0)


# -- magnitude selection -------------------------------------------------------------------------
@dataclass(frozen=True)
class TopSelection:
    """Element j is among the m largest |Δ| (by ordinal rank) iff key_j > threshold, or
    key_j == threshold and j ≥ cut; key = the int32 bit pattern of |Δ_j|."""

    threshold: int
    cut: int

    def mask(self, row: torch.Tensor, part: slice) -> torch.Tensor:
        keys = row[part].abs().view(torch.int32)
        selected = keys > self.threshold
        if part.start >= self.cut:  # the whole chunk lies after the cut: every equal key is kept
            selected |= keys == self.threshold
        elif part.stop > self.cut:
            tail = torch.arange(part.start, part.stop) >= self.cut
            selected |= (keys == self.threshold) & tail
        return selected

    def apply_(self, row: torch.Tensor, part: slice) -> None:
        """Zero, in place, the entries of ``row[part]`` outside the selection — the same values
        as ``row[part] * mask`` but a zeroed entry may be +0 where the product gives −0.

        hardshrink keeps x iff |x| > λ, and for λ = the float whose bits are T that is exactly
        key > T; key ≥ T is key > T − 1. It is one vectorised pass, where a bool mask and a
        multiply take ten times longer on CPU."""
        if self.threshold < 0:
            return
        if self.threshold == _NONE.threshold:
            row[part].zero_()
            return
        before, after = slice(part.start, min(part.stop, max(part.start, self.cut))), slice(max(part.start, self.cut), part.stop)
        for piece, bits in ((before, self.threshold), (after, self.threshold - 1)):
            if piece.stop > piece.start:
                _keep_above_(row[piece], bits)


def _keep_above_(values: torch.Tensor, bits: int) -> None:
    """Zero the entries whose |x|, as int32 bits, is ≤ ``bits`` (bits ≥ −1)."""
    if bits < 0:
        return
    if bits >= 0x7F800000:  # λ would be ∞ or NaN, where hardshrink's comparison is not the bits' order
        values.masked_fill_(values.abs().view(torch.int32) <= bits, 0.0)  # ∞·0 would be NaN
        return
    torch.ops.aten.hardshrink.out(values, _float_of_bits(bits), out=values)


@lru_cache(maxsize=256)
def _float_of_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


_NONE = TopSelection(threshold=0x7FFFFFFF, cut=1 << 62)
_ALL = TopSelection(threshold=-1, cut=0)


def select_top(row: torch.Tensor, m: int, histogram: torch.Tensor | None = None) -> TopSelection:
    """The m largest |row| entries (ties: later elements first, as ordinal ranks order them),
    found with two 16-bit histogram passes and one backward scan — no sort, no full-size copy.
    ``histogram``: the first pass (``high_histogram`` of this row), when the caller made it."""
    n = row.numel()
    if m <= 0:
        return _NONE
    if m >= n:
        return _ALL
    if n <= SMALL_SELECT:
        # small tensors: one sort is cheaper than the histograms' fixed cost; same definition
        keys, order = torch.sort(row.abs().view(torch.int32), stable=True)
        return TopSelection(int(keys[n - m]), int(order[n - m]))
    hist = histogram if histogram is not None else high_histogram(row)
    high, above = _bucket_of_mth_largest(hist, m)
    low_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for part in chunks(n):
        # low 16 bits of the keys in bucket `high`; the others land in the two end bins (no
        # bool mask, no gather: both are slow on CPU)
        offsets = row[part].abs().view(torch.int32).sub_((high << 16) - 1).clamp_(0, (1 << 16) + 1)
        low_hist += torch.bincount(offsets, minlength=(1 << 16) + 2)[1:-1]
    low, above_low = _bucket_of_mth_largest(low_hist, m - above)
    threshold = (high << 16) | low
    need = m - above - above_low  # how many of the elements equal to the threshold are kept
    equal_total = int(low_hist[low])
    if need >= equal_total:
        return TopSelection(threshold, 0)
    # keep the last `need` equal elements: scan chunks from the end
    remaining = need
    for start in range((n - 1) // PASS_CHUNK * PASS_CHUNK, -1, -PASS_CHUNK):
        part = slice(start, min(n, start + PASS_CHUNK))
        hits = torch.nonzero(row[part].abs().view(torch.int32) == threshold).view(-1)
        if hits.numel() >= remaining:  # remaining ≥ 1 here: the cut falls inside this chunk
            return TopSelection(threshold, start + int(hits[hits.numel() - remaining]))
        remaining -= hits.numel()
    raise AssertionError("threshold count changed between passes")  # pragma: no cover


def new_high_histogram() -> torch.Tensor:
    return torch.zeros(1 << 15, dtype=torch.int64)


def high_histogram(row: torch.Tensor, into: torch.Tensor | None = None, part: slice | None = None) -> torch.Tensor:
    """Counts of the high 16 bits of |row| (2^15 buckets: the sign bit is clear), added to
    ``into`` if given; ``part`` restricts it to a range (a caller filling the row chunk by chunk
    counts each chunk while it is in cache)."""
    hist = into if into is not None else new_high_histogram()
    for piece in ([part] if part is not None else chunks(row.numel())):
        hist += torch.bincount(row[piece].abs().view(torch.int32) >> 16, minlength=1 << 15)
    return hist


def _bucket_of_mth_largest(hist: torch.Tensor, m: int) -> tuple[int, int]:
    """(bucket holding the m-th largest value, number of values in higher buckets)."""
    from_top = hist.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor([m]), right=False)[0])
    bucket = hist.numel() - 1 - index
    above = int(from_top[index - 1]) if index > 0 else 0
    return bucket, above


@dataclass(frozen=True)
class BandSelection:
    """Breadcrumbs' keep mask: among the ``upper`` largest but not among the ``outliers``."""

    upper: TopSelection
    outliers: TopSelection

    def mask(self, row: torch.Tensor, part: slice) -> torch.Tensor:
        return self.upper.mask(row, part) & ~self.outliers.mask(row, part)


def top_trim(row: torch.Tensor, k: float, histogram: torch.Tensor | None = None) -> TopSelection | None:
    """TIES trim of a whole flat row: keep the round(k·n) largest |Δ| (None: all are kept). The
    caller zeroes the rest with ``apply_`` chunk by chunk, e.g. in its own pass over the row.
    ``histogram``: see ``select_top``."""
    n = row.numel()
    m = int(k * n + 0.5)
    return None if m >= n else select_top(row, m, histogram)


def band_trim(row: torch.Tensor, k: float, gamma: float) -> BandSelection:
    """Breadcrumbs: drop the round(γ·n) largest |Δ| (outliers), then keep the next round(k·n)
    largest and zero the small rest; if γ + k > 1 fewer outliers are dropped so that round(k·n)
    entries remain (mergekit's rule)."""
    n = row.numel()
    m = int(k * n + 0.5)
    top = int(gamma * n + 0.5)
    if top + m > n:
        top = n - m
    return BandSelection(select_top(row, top + m), select_top(row, top))


def trim_top_(row: torch.Tensor, k: float) -> torch.Tensor:
    """TIES trim in place (``top_trim`` applied to the whole row)."""
    return _apply_(row, top_trim(row, k))


def trim_band_(row: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs in place (``band_trim`` applied to the whole row)."""
    return _apply_(row, band_trim(row, k, gamma))


def _apply_(row: torch.Tensor, selection: TopSelection | BandSelection | None) -> torch.Tensor:
    if selection is not None:
        for part in chunks(row.numel()):
            row[part].mul_(selection.mask(row, part))
    return row
