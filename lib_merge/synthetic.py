"""Synthetic checkpoints with the real key names, for the demo, benchmarks and tests.

Models made from one ``family`` seed share a random "base" and differ by a per-model
perturbation of relative size ``spread``, so they relate like fine-tunes of one base model (high
cosine similarity per block) rather than like unrelated noise. Written through the streaming
writer, so a full-size SDXL file needs memory for one tensor at a time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from .arch import full_layout, get_arch, unet_layout
from .io.writer import SafetensorsWriter
from .methods.registry import key_seed


def synthetic_tensor(key: str, shape: tuple[int, ...], kind: str, *, family: int, model: int, spread: float) -> torch.Tensor:
    if kind == "int":
        if not shape:
            return torch.zeros((), dtype=torch.int64)
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    gen = torch.Generator().manual_seed(key_seed(family, key, "base"))
    scale = 1.0 if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) else 0.02
    base = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(scale)
    if spread:
        gen.manual_seed(key_seed(family * 1_000_003 + model, key, "delta"))
        base.add_(torch.randn(shape, generator=gen, dtype=torch.float32), alpha=scale * spread)
    return base


def write_synthetic_checkpoint(
    path: str | os.PathLike[str],
    arch: str,
    *,
    width_divisor: int = 1,
    family: int = 0,
    model: int = 0,
    spread: float = 0.1,
    dtype: torch.dtype = torch.float16,
    inpainting: bool = False,
    unet_only: bool = False,
    extra: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    spec = get_arch(arch)
    layout = unet_layout(spec, width_divisor) if unet_only else full_layout(spec, width_divisor=width_divisor, inpainting=inpainting)
    if inpainting and unet_only:
        raise ValueError("inpainting layouts are full checkpoints")
    extra = dict(extra or {})
    planned = []
    for key, (shape, kind) in layout.items():
        planned.append((key, shape, torch.int64 if kind == "int" else dtype))
    planned += [(k, tuple(t.shape), t.dtype) for k, t in extra.items()]
    writer = SafetensorsWriter(path, planned, metadata, overwrite=overwrite)
    try:
        for key, (shape, kind) in layout.items():
            t = synthetic_tensor(key, shape, kind, family=family, model=model, spread=spread)
            writer.write(key, t if kind == "int" else t.to(dtype))
        for key, t in extra.items():
            writer.write(key, t)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
