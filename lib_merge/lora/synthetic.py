"""Small synthetic LoRA files with the exact module names the trainers write (kohya: diffusers
names for SD1/SD2, ldm names for SDXL; PEFT: dotted diffusers paths), for the tests and the
benchmark. Shapes come from a checkpoint header, so they fit shrunk synthetic checkpoints too."""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch

from ..methods.registry import key_seed
from .keymap import checkpoint_keymap

_LINEAR = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|self_attn\.(q|k|v|out)_proj"
                     r"|mlp\.fc[12]|attn\.out_proj|mlp\.c_(fc|proj))\.weight$")
_CONV = re.compile(r"(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|\.op|\.conv)\.weight$")


def lora_targets(shapes: Mapping[str, Sequence[int]], arch: str, *, conv: bool = True, text: bool = True) -> dict[str, tuple]:
    """module name → (Target, shape of the targeted weight) for every module kohya would train."""
    table = checkpoint_keymap(shapes)
    chosen: dict[str, tuple] = {}
    for name, target in sorted(table.items()):
        key = target.key
        is_unet = key.startswith("model.diffusion_model.")
        if not is_unet and not text:
            continue
        if not (_LINEAR.search(key) or target.rows or (conv and is_unet and _CONV.search(key))):
            continue
        ldm_name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        if is_unet and (name == ldm_name) != (arch == "sdxl"):
            continue  # kohya writes diffusers names for SD1/SD2, ldm names for SDXL
        shape = tuple(shapes[key])
        if target.rows:
            shape = (target.rows[1] - target.rows[0],) + shape[1:]
        chosen[name] = (target, shape)
    return chosen


def make_module(kind: str, shape: tuple, rank: int, gen: torch.Generator, *, tucker: bool = False) -> dict[str, torch.Tensor]:
    """Random parts of one module of ``kind`` for a weight of ``shape`` (alpha = rank/2)."""
    out, rest = shape[0], math.prod(shape[1:])
    kernel = tuple(shape[2:])
    r = max(1, min(rank, out, rest))

    def rnd(*s):
        return torch.randn(*s, generator=gen) * 0.1

    if kind == "lora":
        if tucker and kernel and kernel != (1, 1):
            parts = {"lora_down.weight": rnd(r, shape[1], 1, 1), "lora_mid.weight": rnd(r, r, *kernel),
                     "lora_up.weight": rnd(out, r, 1, 1)}
        elif kernel:
            parts = {"lora_down.weight": rnd(r, shape[1], *kernel), "lora_up.weight": rnd(out, r, 1, 1)}
        else:
            parts = {"lora_down.weight": rnd(r, rest), "lora_up.weight": rnd(out, r)}
    elif kind == "loha":
        if tucker and kernel and kernel != (1, 1):
            parts = {"hada_w1_a": rnd(r, out), "hada_w1_b": rnd(r, shape[1]), "hada_t1": rnd(r, r, *kernel),
                     "hada_w2_a": rnd(r, out), "hada_w2_b": rnd(r, shape[1]), "hada_t2": rnd(r, r, *kernel)}
        else:
            parts = {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, rest), "hada_w2_a": rnd(out, r), "hada_w2_b": rnd(r, rest)}
    elif kind == "lokr":
        a = 2 if out % 2 == 0 else 1
        c = 2 if shape[1] % 2 == 0 else 1
        b, d = out // a, shape[1] // c
        parts = {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * math.prod(kernel))}
    elif kind == "full":
        parts = {"diff": rnd(*shape), "diff_b": rnd(out)}
        return parts
    else:
        raise ValueError(kind)
    parts["alpha"] = torch.tensor(float(r) / 2)
    return parts


def synthetic_lora(shapes: Mapping[str, Sequence[int]], arch: str, *, kind: str = "lora", rank: int = 4, seed: int = 0,
                   conv: bool = True, text: bool = True, tucker: bool = False) -> dict[str, torch.Tensor]:
    """A kohya/LyCORIS-layout LoRA of ``kind`` for every trainable module of the checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (target, shape) in lora_targets(shapes, arch, conv=conv, text=text).items():
        if target.transpose:
            shape = tuple(reversed(shape))
        gen = torch.Generator().manual_seed(key_seed(seed, name, kind))
        for part, tensor in make_module(kind, shape, rank, gen, tucker=tucker).items():
            tensors[f"{name}.{part}"] = tensor.contiguous()
    return tensors
