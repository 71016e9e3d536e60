"""Per-block statistics of one model, or of B against A (relative difference ‖B − A‖/‖A‖ and
cosine similarity), computed key by key so a 7 GB model never sits in memory."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .arch import ModelInfo, block_of, detect_architecture, key_kind
from .errors import ArchitectureMismatchError
from .io.reader import CheckpointReader, open_checkpoint


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
        items = list(ra.infos.values())
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
                    _accumulate(stats, ra.get(tinfo.key), rb.get(tinfo.key))
            if progress:
                progress(n + 1, len(items))
        return result
    finally:
        if not isinstance(a, CheckpointReader):
            ra.close()
        if rb is not None and not isinstance(b, CheckpointReader):
            rb.close()


def _accumulate(stats: BlockStats, ta: torch.Tensor, tb: torch.Tensor) -> None:
    xa = ta.reshape(-1).double()
    xb = tb.reshape(-1).double()
    stats.sq_a += float(torch.dot(xa, xa))
    stats.sq_b += float(torch.dot(xb, xb))
    stats.dot += float(torch.dot(xa, xb))
    diff = xb - xa
    stats.sq_diff += float(torch.dot(diff, diff))


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
