"""A pot → a checkpoint: Σ wᵢθᵢ / Σ wᵢ per key, cast chunk by chunk to the output dtype, with
the copied keys as stored. Reads the pot only (and the base when scaling from it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

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
    threads: int | None = None, hash_output: bool = True,
) -> tuple[Path, str | None]:
    """Write Σ wᵢθᵢ / Σ wᵢ as a checkpoint; with ``scale`` ≠ 1 (pots with a base only),
    base + scale·(average − base)."""
    from ..metadata import build_soup_metadata

    ingredients = pot.ingredients
    if not ingredients:
        raise SoupError(f"{pot.folder}: the pot is empty; add models first")
    base = pot.data.get("base")
    if scale != 1.0 and not base:
        raise SoupError("soup export --scale needs a pot made with --base (it scales the soup's offset from the base)")
    out_dtype = output_dtype(dtype)
    out_path = Path(output)
    total = pot.total_weight
    fixed = fixed_tensors(pot.folder, pot.data)
    layout = pot.layout or []
    planned = [(k, s, CODE_TO_TORCH[c] if kind == "copy" else out_dtype) for k, s, c, kind in layout]
    metadata = build_soup_metadata(pot, out_path, dtype, scale)
    sums = open_sums(pot.folder, pot.data)
    base_reader = open_checkpoint(base["path"]) if scale != 1.0 else None
    base_name = Path(base["path"]).name if base else ""
    writer = SafetensorsWriter(out_path, planned, metadata, inputs=[sums.path], overwrite=overwrite)
    try:
        def one(key: str) -> int:
            if key in fixed:
                writer.write(key, fixed[key])
                return 0
            src = sums.get(key)
            crc = tensor_crc(src)
            if crc != pot.data["checksums"].get(key):
                raise CorruptPotError(f"{pot.folder}: sums of {key!r} fail their checksum; nothing was exported")
            b = base_reader.get(key).reshape(-1) if base_reader is not None else None
            _write_average(writer, key, src.reshape(-1), b, total, scale, out_dtype, dtype, base_name)
            return crc

        map_keys([k for k, *_ in layout], one, threads, "lib_merge_soup")
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        sums.close()
        if base_reader is not None:
            base_reader.close()
    digest = sha256_file(out_path) if hash_output else None
    return out_path, digest


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

