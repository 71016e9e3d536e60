"""A pot → a checkpoint: Σ wᵢθᵢ / Σ wᵢ per key, cast chunk by chunk to the output dtype, with
the copied keys as stored. Reads the pot only (and the base when scaling from it)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.finite import all_finite
from ..engine.pool import map_keys
from ..errors import CorruptPotError, NonFiniteError, SoupError
from ..io.dtypes import CODE_TO_TORCH, output_dtype
from ..io.hashing import sha256_file
from ..io.reader import open_checkpoint
from ..io.writer import SafetensorsWriter
from .store import CHUNK, fixed_tensors, open_sums, tensor_crc

if TYPE_CHECKING:
    from .pot import Pot


def export_pot(
    pot: Pot, output: str | os.PathLike[str], *, dtype: str = "fp16", scale: float = 1.0, overwrite: bool = False,
    threads: int | None = None, hash_output: bool = True, executor: Any = None,
) -> tuple[Path, str | None]:
    """Write Σ wᵢθᵢ / Σ wᵢ as a checkpoint; with ``scale`` ≠ 1 (pots with a base only),
    base + scale·(average − base). ``executor``: a ``RayExecutor`` runs the keys as Ray tasks
    that open the pot themselves and write into the reserved output (None: local threads)."""
    from ..metadata import build_soup_metadata

    ingredients = pot.ingredients
    if not ingredients:
        raise SoupError(f"{pot.folder}: the pot is empty; add models first")
    base = pot.data.get("base")
    if scale != 1.0 and not base:
        raise SoupError("soup export --scale needs a pot made with --base (it scales the soup's offset from the base)")
    out_dtype = output_dtype(dtype)
    out_path = Path(output)
    layout = pot.layout or []
    planned = [(k, s, CODE_TO_TORCH[c] if kind == "copy" else out_dtype) for k, s, c, kind in layout]
    metadata = build_soup_metadata(pot, out_path, dtype, scale)
    sums_path = pot.folder / pot.data["sums"]
    writer = SafetensorsWriter(out_path, planned, metadata, inputs=[sums_path], overwrite=overwrite)
    try:
        if getattr(executor, "name", "local") == "local":
            with _Export(pot.folder, pot.data, dtype, scale) as export:
                map_keys([k for k, *_ in layout], lambda key: export.write_key(writer, key), threads, "lib_merge_soup")
        else:
            _export_remote(pot, writer, layout, dtype, scale, executor)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    digest = sha256_file(out_path) if hash_output else None
    return out_path, digest


class _Export:
    """What exporting any key reads, opened once per process: the fixed (copied) keys, the sums
    file and, when scaling, the base."""

    def __init__(self, folder: Path, data: dict, dtype: str, scale: float):
        self.folder, self.data, self.dtype, self.scale = folder, data, dtype, scale
        self.out_dtype = output_dtype(dtype)
        self.total = math.fsum(i["weight"] for i in data["ingredients"])  # as Pot.total_weight
        self.fixed = fixed_tensors(folder, data)
        self.sums = open_sums(folder, data)
        base = data.get("base")
        self.base_name = Path(base["path"]).name if base else ""
        try:
            self.base_reader = open_checkpoint(base["path"]) if scale != 1.0 else None
        except BaseException:
            self.sums.close()
            raise

    def write_key(self, writer: Any, key: str) -> None:
        if key in self.fixed:
            writer.write(key, self.fixed[key])
            return
        src = self.sums.get(key)
        if tensor_crc(src) != self.data["checksums"].get(key):
            raise CorruptPotError(f"{self.folder}: sums of {key!r} fail their checksum; nothing was exported")
        b = self.base_reader.get(key).reshape(-1) if self.base_reader is not None else None
        _write_average(writer, key, src.reshape(-1), b, self.total, self.scale, self.out_dtype, self.dtype,
                       self.base_name)

    def __enter__(self) -> "_Export":
        return self

    def __exit__(self, *exc) -> None:
        self.sums.close()
        if self.base_reader is not None:
            self.base_reader.close()


@dataclass
class ExportShardSpec:
    folder: str
    inputs: list  # file_identity of the manifest, the sums and (scaling) the base
    tmp_path: str
    header_sha256: str
    dtype: str
    scale: float


def export_shard(spec: ExportShardSpec, keys: list[str]) -> dict:
    """One shard of an export, on a Ray worker: open the pot, write the keys into the reserved file."""
    import time

    from ..engine.executor import ReservedFile, check_inputs, worker_report
    from .store import read_manifest

    started = time.perf_counter()
    check_inputs(spec.inputs)
    out = ReservedFile(spec.tmp_path, spec.header_sha256)
    try:
        folder = Path(spec.folder)
        with _Export(folder, read_manifest(folder), spec.dtype, spec.scale) as export:
            for key in keys:
                export.write_key(out, key)
    except BaseException:
        out.abandon()
        raise
    out.close()
    return worker_report(started, len(keys), 0)


def _export_remote(pot: Pot, writer: SafetensorsWriter, layout: list, dtype: str, scale: float, executor: Any) -> None:
    import hashlib

    from ..engine.executor import file_identity, group_shards
    from ..engine.pool import StopFlag
    from .store import MANIFEST

    base = pot.data.get("base")
    files = [pot.folder / MANIFEST, pot.folder / pot.data["sums"]] + ([Path(base["path"])] if scale != 1.0 else [])
    spec = ExportShardSpec(str(pot.folder.resolve()), file_identity([f.resolve() for f in files]),
                           str(writer.tmp_path.resolve()), hashlib.sha256(writer.header_bytes).hexdigest(), dtype, scale)
    numel = {k: _numel(s) for k, s, *_ in layout}
    shards = group_shards([(k, numel[k] * 8, 0) for k, *_ in layout], executor.shard_bytes)
    # a task maps one key's fp64 sums (and base) at a time and casts it through one chunk buffer
    memory = max(numel.values(), default=0) * 10 + 3 * CHUNK * 8

    def done(shard, result) -> None:
        for key in shard.keys:
            writer.complete(key)

    executor.run_shards(export_shard, spec, shards, memory=memory, cancel=StopFlag(None), on_done=done)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_average(
    writer: SafetensorsWriter, key: str, flat: torch.Tensor, base: torch.Tensor | None, total: float, scale: float,
    out_dtype: torch.dtype, dtype: str, base_name: str,
) -> None:
    """One key's average (offset from ``base`` by ``scale`` when given) through one chunk buffer,
    in fp64 until the cast; a chunk that is not finite after the cast is refused, naming the base
    when the base itself is damaged."""
    buf = torch.empty(min(CHUNK, flat.numel()), dtype=out_dtype)
    for start in range(0, flat.numel(), CHUNK):
        stop = min(flat.numel(), start + CHUNK)
        mean = flat[start:stop] / total
        if base is not None:
            part = base[start:stop].to(torch.float64)
            mean = part + scale * (mean - part)
        chunk = buf[: stop - start]
        chunk.copy_(mean)
        if not all_finite(chunk):
            if base is not None and not all_finite(base[start:stop]):
                raise NonFiniteError(f"{key}: NaN/Inf in the base {base_name}; "
                                     "that checkpoint is damaged — export without --scale")
            raise NonFiniteError(f"{key}: the soup average overflows {dtype}; export with --dtype fp32 or bf16")
        writer.write_part(key, start, chunk)
    writer.complete(key)

