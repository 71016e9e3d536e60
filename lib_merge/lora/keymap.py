"""LoRA module names → checkpoint keys (lora-reference.md §2).

The map is built from the checkpoint's own keys, never by parsing underscores (``transformer_blocks``,
``in_layers`` and ``to_out`` make that ambiguous): every weight key is turned into the module
names the trainers write for it — kohya's ldm-style name (SDXL), the diffusers-style name (SD1/SD2
kohya files, OneTrainer and PEFT SDXL files) and, for OpenCLIP text encoders, the HF CLIP names of
the q/k/v slices of the fused ``in_proj_weight``. A LoRA module is then one dictionary lookup.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..arch.keys import UNET_PREFIX

_RESNET_PARTS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut",
}
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_OPENCLIP_PARTS = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
# (checkpoint prefix, kohya prefix, HF CLIP?) of every text encoder we know
_TEXT_ENCODERS = (
    ("cond_stage_model.transformer.", "lora_te_", True),  # SD1 CLIP-L
    ("conditioner.embedders.0.transformer.", "lora_te1_", True),  # SDXL CLIP-L
    ("cond_stage_model.model.", "lora_te_", False),  # SD2 OpenCLIP-H
    ("conditioner.embedders.1.model.", "lora_te2_", False),  # SDXL OpenCLIP-G
)
# Prefixes other writers put before the same module path, with the kohya prefix they stand for.
_ALIASES = (
    ("lycoris_", "lora_unet_"),
    ("base_model.model.", "lora_unet_"),
    ("unet.", "lora_unet_"),
    ("lora_unet.", "lora_unet_"),
    ("text_encoder_2.", "lora_te2_"),
    ("text_encoder.", "lora_te1_"),  # SDXL; SD1 files say lora_te_ (see normalise)
    ("te1.", "lora_te1_"),
    ("te2.", "lora_te2_"),
    ("te.", "lora_te_"),
)


@dataclass(frozen=True)
class Target:
    """Where one LoRA module lands: a checkpoint key, optionally a row range of it (the q/k/v
    slice of a fused attention) and whether the delta is transposed (OpenCLIP ``x·P``)."""

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


def _unet_diffusers(path: str) -> str | None:
    """The diffusers module path of an ldm U-Net module path (no ``.weight``), or None."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    mid = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if mid:
        n, rest = int(mid.group(1)), mid.group(2) or ""
        kind = "attn" if n == 1 else "res"
        head = "mid_block.attentions.0" if n == 1 else f"mid_block.resnets.{n // 2}"
        return _sublayer(head, kind, rest)
    m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m is None:
        return None
    side, n, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) or ""
    if side == "input":
        if n == 0:
            return None
        i, j = (n - 1) // 3, (n - 1) % 3
        if j == 2:  # the downsampler closes each level
            return f"down_blocks.{i}.downsamplers.0.conv" if k == 0 and rest == "op" else None
        head = f"down_blocks.{i}.{'resnets' if k == 0 else 'attentions'}.{j}"
    else:
        i, j = n // 3, n % 3
        if k > 0 and rest == "conv":  # the upsampler, .1 or .2 after an attention (§2)
            return f"up_blocks.{i}.upsamplers.0.conv"
        head = f"up_blocks.{i}.{'resnets' if k == 0 else 'attentions'}.{j}"
    return _sublayer(head, "res" if k == 0 else "attn", rest)


def _sublayer(head: str, kind: str, rest: str) -> str | None:
    if kind == "attn":  # transformer internals have the same names on both sides
        return f"{head}.{rest}" if rest else head
    for ldm, diff in _RESNET_PARTS.items():
        if rest == ldm:
            return f"{head}.{diff}"
    return None


def _flat(path: str) -> str:
    return path.replace(".", "_")


def build_keymap(keys) -> dict[str, Target]:
    """Every LoRA module name (kohya form) that can target ``keys`` (a checkpoint's key set)."""
    keyset = set(keys)
    table: dict[str, Target] = {}
    for key in keyset:
        if key.startswith(UNET_PREFIX):
            if not key.endswith(".weight"):
                continue
            path = key[len(UNET_PREFIX):-len(".weight")]
            table["lora_unet_" + _flat(path)] = Target(key)
            diff = _unet_diffusers(path)
            if diff is not None:
                table.setdefault("lora_unet_" + _flat(diff), Target(key))
            continue
        for prefix, lora_prefix, hf in _TEXT_ENCODERS:
            if not key.startswith(prefix):
                continue
            path = key[len(prefix):]
            if hf:
                if path.endswith(".weight"):
                    table[lora_prefix + _flat(path[:-len(".weight")])] = Target(key)
            else:
                _openclip_names(table, key, path, lora_prefix)
            break
    return table


def _openclip_names(table: dict[str, Target], key: str, path: str, lora_prefix: str) -> None:
    """OpenCLIP is trained as HF CLIP (``text_model_encoder_layers_N_…``); map back to the fused
    layout: q/k/v are row slices of ``in_proj_weight``, ``text_projection`` is transposed."""
    if path == "text_projection":
        table[lora_prefix + "text_projection"] = Target(key, transpose=True)
        return
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.weight$", path) or \
        re.match(r"transformer\.resblocks\.(\d+)\.attn\.(in_proj)_weight$", path)
    if m is None:
        return
    layer, part = m.group(1), m.group(2)
    base = f"{lora_prefix}text_model_encoder_layers_{layer}_"
    if part == "in_proj":
        return  # filled in by fused_slices, which needs the shape
    if part in _OPENCLIP_PARTS:
        table[base + _OPENCLIP_PARTS[part]] = Target(key)


def add_fused_slices(table: dict[str, Target], shapes) -> dict[str, Target]:
    """Add q/k/v slice targets of every OpenCLIP ``in_proj_weight`` (rows [0:d], [d:2d], [2d:3d])."""
    for key, shape in shapes.items():
        if not key.endswith(".attn.in_proj_weight"):
            continue
        for prefix, lora_prefix, hf in _TEXT_ENCODERS:
            if hf or not key.startswith(prefix):
                continue
            m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", key[len(prefix):])
            if m is None:
                continue
            d = int(shape[0]) // 3
            base = f"{lora_prefix}text_model_encoder_layers_{m.group(1)}_self_attn_"
            for i, name in enumerate("qkv"):
                table[f"{base}{name}_proj"] = Target(key, rows=(i * d, (i + 1) * d))
    return table


def checkpoint_keymap(shapes) -> dict[str, Target]:
    """:func:`build_keymap` plus the fused q/k/v slices, from a header's ``key → shape``."""
    return add_fused_slices(build_keymap(shapes), shapes)


def normalise(module: str, sdxl: bool) -> str:
    """A LoRA module name in kohya form: PEFT/diffusers/LyCORIS prefixes → ``lora_unet_``/
    ``lora_te*_`` and dots → underscores (the rest of the name is the module path either way)."""
    for alias, kohya in _ALIASES:
        if module.startswith(alias):
            if kohya == "lora_te1_" and not sdxl:
                kohya = "lora_te_"
            module = kohya + module[len(alias):]
            break
    if not sdxl and module.startswith("lora_te1_"):
        module = "lora_te_" + module[len("lora_te1_"):]
    return module.replace(".", "_")
