"""What a pot holds and the one numeric step of every change: the key layout, fixed by the first
model (or the base), every later model checked against it, and new sums = old sums + Σ coef·θ,
streamed key by key into a new sums file (coef = +w to add, −w to remove, the difference to
reweight). Only the changed models and the old sums are read, never the other ingredients."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..arch import detect_architecture, key_kind
from ..engine.finite import all_finite
from ..engine.pool import map_keys
from ..errors import ArchitectureMismatchError, CorruptPotError, NonFiniteError
from ..io.dtypes import CODE_TO_TORCH
from ..io.reader import CheckpointReader, SafetensorsReader
from ..io.writer import SafetensorsWriter
from .store import CHUNK, FIXED, FORMAT, tensor_crc


def adopt_layout(folder: Path, reader: CheckpointReader, data: dict[str, Any]) -> None:
    """Fix the pot's architecture and key layout from ``reader`` and store its copied keys."""
    info = detect_architecture(reader.shapes(), reader.metadata, source=str(reader.path))
    layout = []
    for key, item in sorted(reader.infos.items(), key=lambda kv: kv[1].offset):
        kind = key_kind(key, item.dtype, item.shape)
        if kind != "drop":
            layout.append([key, list(item.shape), item.dtype, "sum" if kind == "merge" else "copy"])
    fixed = [(k, tuple(s), CODE_TO_TORCH[c]) for k, s, c, kind in layout if kind == "copy"]
    checksums = {}
    if fixed:
        writer = SafetensorsWriter(folder / FIXED, fixed, {"format": FORMAT + "-fixed"}, overwrite=True)
        try:
            for key, _, _ in fixed:
                t = reader.get(key)
                if not all_finite(t):  # copied into every export unchanged: refuse it here
                    raise NonFiniteError(
                        f"{key}: NaN/Inf in {reader.path.name}, which the pot would copy into every export; "
                        "that checkpoint is damaged — the pot was not changed"
                    )
                checksums[key] = tensor_crc(t)
                writer.write(key, t.contiguous())
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    data.update(arch=info.arch.name, inpainting=info.inpainting, layout=layout,
                fixed=FIXED if fixed else None, fixed_checksums=checksums)


def check_compatible(folder: Path, reader: CheckpointReader, data: dict[str, Any]) -> None:
    """Refuse a model of another architecture, or whose keys or shapes differ from the pot's."""
    info = detect_architecture(reader.shapes(), reader.metadata, source=str(reader.path))
    if info.arch.name != data["arch"] or info.inpainting != data["inpainting"]:
        kind = lambda arch, inp: f"{arch}{' inpainting' if inp else ''}"  # noqa: E731
        raise ArchitectureMismatchError(
            f"{reader.path.name} is {kind(info.arch.name, info.inpainting)} but the pot {folder.name} holds "
            f"{kind(data['arch'], data['inpainting'])} models; use a pot per architecture"
        )
    problems = []
    for key, shape, _, _ in data["layout"]:
        item = reader.infos.get(key)
        if item is None:
            problems.append(f"lacks {key}")
        elif tuple(item.shape) != tuple(shape):
            problems.append(f"{key} is {list(item.shape)}, the pot has {list(shape)}")
    keys = {k for k, *_ in data["layout"]}
    extra = [k for k, i in reader.infos.items() if k not in keys and key_kind(k, i.dtype, i.shape) != "drop"]
    if extra:
        problems.append(f"has {len(extra)} key(s) the pot lacks (e.g. {extra[0]})")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ArchitectureMismatchError(
            f"{reader.path.name} does not match the pot's layout: {'; '.join(problems[:3])}{more}"
        )


def write_sums(
    folder: Path, data: dict[str, Any], old: SafetensorsReader | None, old_checksums: dict[str, int],
    readers: list[CheckpointReader], coefs: list[float], threads: int | None,
) -> None:
    """Write ``data``'s generation of the sums file (old + Σ coef·θ) and record its name and
    checksums in ``data``. The CRCs of the old bytes, taken as they are read, must match
    ``old_checksums``: a corrupted pot is refused rather than carried into the new sums."""
    name = f"sums-{data['generation']:06d}.safetensors"
    summed = [(k, tuple(s)) for k, s, _, kind in data["layout"] if kind == "sum"]
    writer = SafetensorsWriter(folder / name, [(k, s, torch.float64) for k, s in summed],
                               {"format": FORMAT + "-sums", "generation": str(data["generation"])}, overwrite=True)
    try:
        checksums = map_keys(
            [k for k, _ in summed], lambda key: _update_key(key, old, readers, coefs, writer), threads, "lib_merge_soup"
        )
        if old is not None:
            for key, (old_crc, _) in checksums.items():
                if old_crc != old_checksums.get(key):
                    raise CorruptPotError(
                        f"{folder}: sums of {key!r} fail their checksum — the pot is corrupted; nothing was changed"
                    )
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    data["sums"] = name
    data["checksums"] = {k: new for k, (_, new) in checksums.items()}


def _update_key(key: str, old: SafetensorsReader | None, readers: list[CheckpointReader], coefs: list[float],
                writer: SafetensorsWriter) -> tuple[int | None, int]:
    """One key: stream old + Σ coef·θ into the new sums file; returns (CRC of the old bytes, CRC of the new)."""
    src = old.get(key).reshape(-1) if old is not None else None
    old_crc = tensor_crc(src) if src is not None else None
    models = [r.get(key).reshape(-1) for r in readers]
    n = models[0].numel() if models else src.numel()  # type: ignore[union-attr]
    buf = torch.empty(min(CHUNK, n), dtype=torch.float64)
    crc = 0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        acc = buf[: stop - start]
        if src is not None:
            acc.copy_(src[start:stop])
        else:
            acc.zero_()
        for model, coef, reader in zip(models, coefs, readers):
            part = model[start:stop]
            if not all_finite(part):
                raise NonFiniteError(f"{reader.path.name}: NaN/Inf in {key}; that checkpoint is damaged — the pot was not changed")
            acc.add_(part.to(torch.float64), alpha=coef)
        crc = tensor_crc(acc, crc)
        writer.write_part(key, start, acc)
    writer.complete(key)
    return old_crc, crc
