"""Slim synthetic SD1 U-Nets for the many-model tests: real key names and shapes, but only the
keys the architecture detection needs plus the large 3×3 convolutions (~65 keys instead of 686),
so N-model merges run in a fraction of a second. Models of one ``family`` share a base and differ
like fine-tunes (see lib_merge.synthetic)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from lib_merge.arch import unet_layout
from lib_merge.io.writer import SafetensorsWriter
from lib_merge.synthetic import synthetic_tensor

_GROUP = re.compile(r"model\.diffusion_model\.(input_blocks\.\d+|output_blocks\.\d+|middle_block|out|time_embed)\.")


def slim_layout(width_divisor: int = 32) -> dict:
    seen: set[str] = set()
    keep = {}
    for key, value in unet_layout("sd1", width_divisor).items():
        match = _GROUP.match(key)
        group = match.group(1) if match else key
        if group not in seen or key.endswith("proj_in.weight") or (key.endswith(".weight") and "in_layers.2" in key):
            seen.add(group)
            keep[key] = value
    return keep


def write_slim_unet(path: Path, *, model: int, family: int = 4, width_divisor: int = 32,
                    dtype: torch.dtype = torch.float16, nan_key: str | None = None) -> Path:
    layout = slim_layout(width_divisor)
    writer = SafetensorsWriter(path, [(k, s, dtype) for k, (s, _) in layout.items()], overwrite=True)
    for key, (shape, kind) in layout.items():
        t = synthetic_tensor(key, shape, kind, family=family, model=model, spread=0.1)
        if key == nan_key:
            t.view(-1)[0] = float("nan")
        writer.write(key, t.to(dtype))
    return writer.finish()
