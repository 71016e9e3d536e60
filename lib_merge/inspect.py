"""Per-block statistics of one model, or of B against A (relative difference ‖B − A‖/‖A‖ and
cosine similarity), computed key by key so a 7 GB model never sits in memory."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .arch import ModelInfo, block_of, detect_architecture, key_kind
from .arch.detect import prediction_type
from .errors import ArchitectureMismatchError
from .io.reader import CheckpointReader, open_checkpoint
from .torch_threads import on_one_torch_thread


@dataclass
class BlockStats:
    keys: int = 0
    params: int = 0
    # comparison sums, accumulated in fp64 over the merge-able keys of the block
    sq_a: float = 0.0
    sq_diff: float = 0.0
    dot: float = 0.0
    sq_b: float = 0.0

    @property
    def relative_difference(self) -> float:
        return math.sqrt(self.sq_diff / self.sq_a) if self.sq_a > 0 else float("nan")

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.sq_a * self.sq_b)
        return self.dot / denom if denom > 0 else float("nan")


@dataclass
class Inspection:
    path: str
    info: ModelInfo
    dtypes: Counter
    blocks: dict[str, BlockStats]
    other_path: str | None = None
    policy: str = "supermerger"
    missing_in_b: list[str] = field(default_factory=list)
    prediction: str | None = None  # eps, v, v+ztsnr, eps+ztsnr, edm-v; None = the file does not say

    @property
    def total_params(self) -> int:
        return sum(b.params for b in self.blocks.values())


def inspect_models(
    a: str | CheckpointReader,
    b: str | CheckpointReader | None = None,
    *,
    policy: str = "supermerger",
    progress: Callable[[int, int], None] | None = None,
) -> Inspection:
    """Per-block counts of A, and with B the comparison sums (``progress`` is called from the
    worker thread that runs them with one torch thread; see ``torch_threads``)."""
    return on_one_torch_thread(_inspect, a, b, policy=policy, progress=progress)


def _inspect(a, b, *, policy: str, progress: Callable[[int, int], None] | None) -> Inspection:
    ra = a if isinstance(a, CheckpointReader) else open_checkpoint(a)
    rb = b if isinstance(b, CheckpointReader) or b is None else open_checkpoint(b)
    try:
        info = detect_architecture(ra.shapes(), ra.metadata, source=str(ra.path))
        if rb is not None:
            info_b = detect_architecture(rb.shapes(), rb.metadata, source=str(rb.path))
            if info_b.arch.name != info.arch.name:
                raise ArchitectureMismatchError(
                    f"cannot compare {info.arch.label} {ra.path.name} with {info_b.arch.label} {rb.path.name}"
                )
        result = Inspection(
            str(ra.path), info, Counter(), {name: BlockStats() for name in info.arch.blocks},
            str(rb.path) if rb is not None else None, policy,
        )
        result.prediction = prediction_type(info, ra.infos)
        items = list(ra.infos.values())
        scratch = _Scratch()
        for n, tinfo in enumerate(items):
            stats = result.blocks[block_of(info.arch, tinfo.key, policy)]
            stats.keys += 1
            stats.params += tinfo.numel
            result.dtypes[tinfo.dtype] += 1
            if rb is not None and key_kind(tinfo.key, tinfo.dtype, tinfo.shape) == "merge":
                other = rb.infos.get(tinfo.key)
                if other is None:
                    result.missing_in_b.append(tinfo.key)
                elif other.shape == tinfo.shape:
                    _accumulate(stats, ra.get(tinfo.key), rb.get(tinfo.key), scratch)
            if progress:
                progress(n + 1, len(items))
        return result
    finally:
        if not isinstance(a, CheckpointReader):
            ra.close()
        if rb is not None and not isinstance(b, CheckpointReader):
            rb.close()


# Elements per step of the comparison (4 MiB per fp32 buffer): big enough that the torch calls per
# step cost little next to the work on a busy 2-core machine, small enough to stay in cache.
COMPARE_CHUNK = 1 << 20


class _Scratch:
    """Reused fp32 buffers: A's and B's slices and their products. Fresh full-size fp64 copies of every tensor (A, B and B − A)
    page-fault 24 bytes per parameter and made the board's Compare of two 2 GB SD1.5 files take
    70-80 s on the real A1111."""

    def __init__(self) -> None:
        self.a = torch.empty(COMPARE_CHUNK, dtype=torch.float32)
        self.b = torch.empty(COMPARE_CHUNK, dtype=torch.float32)
        self.product = torch.empty(COMPARE_CHUNK, dtype=torch.float32)


def _accumulate(stats: BlockStats, ta: torch.Tensor, tb: torch.Tensor, scratch: _Scratch | None = None) -> None:
    """Add the key's ‖A‖², ‖B‖², A·B and ‖B−A‖² to the block's sums. Slices are worked in fp32
    (fp16/bf16 values are exact there) and each product is summed by torch's pairwise reduction
    (~1e-7 relative; ``torch.dot``'s running sum was 5e-5 off over a 1 M slice, enough to move the
    cosine's 4th digit); the slices add up in fp64. Identical models still give exactly 0."""
    scratch = scratch or _Scratch()
    fa, fb = ta.reshape(-1), tb.reshape(-1)
    sums = [0.0, 0.0, 0.0, 0.0]  # ‖A‖², ‖B‖², A·B, ‖B−A‖²
    for start in range(0, fa.numel(), COMPARE_CHUNK):
        stop = min(start + COMPARE_CHUNK, fa.numel())
        xa, xb, product = (buf[: stop - start] for buf in (scratch.a, scratch.b, scratch.product))
        xa.copy_(fa[start:stop])
        xb.copy_(fb[start:stop])
        for i, (x, y) in enumerate(((xa, xa), (xb, xb), (xa, xb))):
            sums[i] += float(torch.mul(x, y, out=product).sum())
        diff = xb.sub_(xa)
        sums[3] += float(torch.mul(diff, diff, out=product).sum())
    stats.sq_a += sums[0]
    stats.sq_b += sums[1]
    stats.dot += sums[2]
    stats.sq_diff += sums[3]


def format_inspection(result: Inspection) -> str:
    info = result.info
    flags = []
    if info.inpainting:
        flags.append("inpainting")
    if info.v_prediction:
        flags.append("v-prediction")
    if info.ztsnr:
        flags.append("zero-terminal-SNR")
    lines = [
        f"{result.path}: {info.arch.label}{' (' + ', '.join(flags) + ')' if flags else ''}, "
        f"{sum(b.keys for b in result.blocks.values())} keys, {result.total_params / 1e6:.1f} M parameters, "
        f"dtypes {', '.join(f'{k}×{v}' for k, v in sorted(result.dtypes.items()))}",
    ]
    lines.append(f"  prediction: {result.prediction or 'unknown (no marker; SD2 768-v files carry none)'}")
    for note in info.notes:
        lines.append(f"  note: {note}")
    compare = result.other_path is not None
    if compare:
        lines.append(f"compared with {result.other_path} (relative difference ‖B−A‖/‖A‖, cosine similarity)")
    header = f"{'block':<6} {'keys':>6} {'params (M)':>11}"
    if compare:
        header += f" {'rel diff':>9} {'cosine':>8}"
    lines.append(header)
    for name, stats in result.blocks.items():
        row = f"{name:<6} {stats.keys:>6} {stats.params / 1e6:>11.2f}"
        if compare:
            row += f" {stats.relative_difference:>9.4f} {stats.cosine:>8.4f}"
        lines.append(row)
    if result.missing_in_b:
        lines.append(f"B lacks {len(result.missing_in_b)} keys of A (e.g. {result.missing_in_b[0]})")
    return "\n".join(lines)
