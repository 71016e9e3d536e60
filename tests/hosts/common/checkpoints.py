# No host module: tiny ldm-layout checkpoint files, as both hosts load them (model.diffusion_model.* keys).
"""Tiny SD1- and SDXL-flavoured U-Nets with the real block structure (12 / 9 input blocks), and
checkpoint files holding them plus a shrunk text encoder, so detection, planning and the
streaming engine treat them like real SD1 / SDXL files."""
from __future__ import annotations

from pathlib import Path

import torch

from lib_merge.arch import full_layout
from lib_merge.io.writer import SafetensorsWriter
from lib_merge.synthetic import synthetic_tensor
from lib_merge.testing import make_tiny_unet

PREFIX = "model.diffusion_model."
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")


def tiny_unet(flavour: str, seed: int = 0, dtype: torch.dtype = torch.float32, *, width: int = 32):
    """``width`` = model channels (32 by default; 8 makes a ~0.5 M-parameter model for loops)."""
    small = dict(model_channels=width, norm_groups=min(32, width))
    if flavour == "sd1":
        model = make_tiny_unet(
            "sd1", seed, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(1, 2, 4),
            transformer_depth=(1, 1, 1, 0), **small,
        )
    elif flavour == "sdxl":
        model = make_tiny_unet("sdxl", seed, num_res_blocks=2, **small)
    else:
        raise ValueError(flavour)
    return model.to(dtype)


def write_checkpoint(
    path: Path, flavour: str, seed: int, dtype: torch.dtype = torch.float16, unet=None, *, width: int = 32
) -> Path:
    """A single-file checkpoint: the tiny U-Net of ``seed`` plus a 1/64-width text encoder."""
    unet = unet if unet is not None else tiny_unet(flavour, seed, width=width)
    tensors = {PREFIX + k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}
    arch = "sd1" if flavour == "sd1" else "sdxl"
    for key, (shape, kind) in full_layout(arch, width_divisor=64).items():
        if key.startswith(TEXT_PREFIXES):
            t = synthetic_tensor(key, shape, kind, family=seed, model=seed, spread=0.1)
            tensors[key] = t if kind == "int" else t.to(dtype)
    writer = SafetensorsWriter(path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], {}, overwrite=True)
    for k, t in tensors.items():
        writer.write(k, t)
    return writer.finish()


def loaded_unet(path: Path, flavour: str, dtype: torch.dtype = torch.float16):
    """A U-Net module holding the weights of ``path`` (what a WebUI has after loading it)."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    width = int(sd[PREFIX + "input_blocks.0.0.weight"].shape[0])
    model = tiny_unet(flavour, 0, dtype, width=width)
    model.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)})
    return model.to(dtype)
