"""PNG grids of toy samples, written with zlib alone (the core installs no image library).

Images are tiny (16×16), so a grid scales each pixel up by an integer factor (nearest
neighbour: no smoothing hides what the model drew) and separates cells by a gutter.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a uint8 (3, H, W) RGB image."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    _, height, width = image.shape
    rows = image.permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def grid(rows: Sequence[torch.Tensor], *, scale: int = 4, gutter: int = 2, background: int = 255) -> torch.Tensor:
    """One uint8 image of ``rows`` (each uint8 (N, 3, h, w)); short rows are padded with background."""
    if not rows:
        raise ValueError("a grid needs at least one row")
    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    cell_h, cell_w = h * scale + gutter, w * scale + gutter
    out = torch.full((3, len(rows) * cell_h + gutter, cols * cell_w + gutter), background, dtype=torch.uint8)
    for i, row in enumerate(rows):
        big = row.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        for j in range(row.shape[0]):
            top, left = gutter + i * cell_h, gutter + j * cell_w
            out[:, top:top + h * scale, left:left + w * scale] = big[j]
    return out


def write_png(path: str | os.PathLike[str], image: torch.Tensor) -> Path:
    """Write atomically (temp file, then rename): an interrupted run leaves no half image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_png(image))
    os.replace(tmp, path)
    return path
