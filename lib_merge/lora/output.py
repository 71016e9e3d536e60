"""Writing a LoRA file in kohya's layout with the metadata A1111's and Forge's built-in Lora reads
(lora-reference.md §4): family detection keys, network dim/alpha, modelspec, and
``sshs_model_hash`` = SHA-256 of the bytes after the header (A1111's LoRA hash)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..io.writer import SafetensorsWriter

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
RESOLUTION = {"sd1": "512x512", "sd2": "768x768", "sdxl": "1024x1024"}


def lora_metadata(family: str, *, dims: Sequence[int], conv_dims: Sequence[int] = (), v_prediction: bool = False,
                  title: str = "", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    def one(values):
        values = sorted(set(values))
        return str(values[0]) if len(values) == 1 else "Dynamic"
    args = {}
    if conv_dims:
        args = {"conv_dim": one(conv_dims), "conv_alpha": one(conv_dims)}
    base = BASE_VERSION[family] + ("_v" if family == "sd2" and v_prediction else "")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": one(dims) if dims else "0",
        "ss_network_alpha": one(dims) if dims else "0",  # α = rank: s = 1
        "ss_network_args": json.dumps(args),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": base,
        "ss_v_parameterization": str(bool(v_prediction)),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE[family] + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title,
        "modelspec.resolution": RESOLUTION[family],
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    meta.update(extra or {})
    return meta


def write_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], *,
               overwrite: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """Write ``tensors`` (sorted by key) atomically, with ``sshs_model_hash`` added to ``metadata``."""
    keys = sorted(tensors)
    digest = hashlib.sha256()
    for key in keys:
        digest.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    metadata = dict(metadata, sshs_model_hash=digest.hexdigest())
    planned = [(k, tuple(tensors[k].shape), tensors[k].dtype) for k in keys]
    writer = SafetensorsWriter(path, planned, metadata, overwrite=overwrite, inputs=inputs)
    try:
        for key in keys:
            writer.write(key, tensors[key].contiguous())
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
