"""Reading what a test wrote, with the reference safetensors library (not ours)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    return load_file(str(path))


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def leftovers(folder: Path, name: str) -> list[Path]:
    """``name`` itself and anything derived from it (``NAME.tmp`` …) in ``folder``."""
    return sorted(p for p in folder.iterdir() if p.name == name or p.name.startswith(name + "."))
