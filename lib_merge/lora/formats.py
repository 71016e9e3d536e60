"""LoRA files: keys grouped into modules, each module's type recognised from its parts, and the
shape of its delta known from the header alone (so a LoRA for another architecture is refused
before any tensor is read). lora-reference.md §1.1–1.2.

A module is ``name → {part: key}``. kohya/LyCORIS keys are ``<module>.<part>`` split at the first
dot; PEFT/diffusers keys (``unet.….to_k.lora_A.weight``) are recognised by their suffix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptFileError, MergeError
from ..io.reader import CheckpointReader, open_checkpoint


class LoraFormatError(MergeError):
    """A LoRA file we cannot read as any known network type."""


# Suffix spellings of writers other than kohya/LyCORIS → the kohya part name.
_PEFT_SUFFIXES = (
    (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"), (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
    ("_lora.down.weight", "lora_down.weight"), ("_lora.up.weight", "lora_up.weight"),
    (".lora_down.weight", "lora_down.weight"), (".lora_up.weight", "lora_up.weight"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")

KNOWN_PARTS = {
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "magnitude"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"},
    "ia3": {"weight", "on_input"},
    "full": {"diff", "diff_b", "alpha"},
    "norm": {"w_norm", "b_norm", "alpha"},
}


@dataclass
class Module:
    name: str  # as written in the file (kohya form, or the PEFT module path)
    kind: str
    parts: dict[str, str] = field(default_factory=dict)  # part → key in the file


def split_key(key: str) -> tuple[str, str] | None:
    if key.startswith(_KOHYA_PREFIXES):
        module, _, part = key.partition(".")
        return (module, part) if part else None
    for suffix, part in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def module_kind(name: str, parts: set[str]) -> str:
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        kind = "lora"
    elif "hada_w1_a" in parts:
        kind = "loha"
    elif parts & {"lokr_w1", "lokr_w1_a"}:
        kind = "lokr"
    elif "diff" in parts:
        kind = "full"
    elif "w_norm" in parts:
        kind = "norm"
    elif "weight" in parts:
        kind = "ia3"
    else:
        raise LoraFormatError(f"module {name}: parts {', '.join(sorted(parts))} are no known network type "
                              "(LoRA, LoCon, LoHa, LoKr, IA3, full, norm; OFT/BOFT/GLoRA are not supported)")
    extra = parts - KNOWN_PARTS[kind]
    if extra:
        raise LoraFormatError(f"module {name}: unknown part(s) {', '.join(sorted(extra))} in a {kind} module; "
                              "the file uses a network type this tool does not support")
    return kind


class LoraFile:
    """One opened LoRA file: its modules (in file order) and metadata; tensors read on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self.reader: CheckpointReader = open_checkpoint(self.path)
        except MergeError as exc:
            raise CorruptFileError(f"LoRA {exc}") from None
        try:
            self.modules = self._group()
        except BaseException:
            self.reader.close()
            raise

    def _group(self) -> dict[str, Module]:
        modules: dict[str, Module] = {}
        stray: list[str] = []
        for key in self.reader.infos:
            split = split_key(key)
            if split is None:
                stray.append(key)
                continue
            name, part = split
            modules.setdefault(name, Module(name, "")).parts[part] = key
        if not modules:
            hint = " It looks like a checkpoint, not a LoRA." if any(k.startswith("model.diffusion_model.") for k in stray) else ""
            raise LoraFormatError(f"{self.path}: no LoRA/LyCORIS module keys found (e.g. lora_unet_….lora_down.weight)."
                                  f"{hint}")
        if stray:
            raise LoraFormatError(f"{self.path}: {len(stray)} key(s) of no known LoRA layout (e.g. {stray[0]})")
        for module in modules.values():
            try:
                module.kind = module_kind(module.name, set(module.parts))
            except LoraFormatError as exc:
                raise LoraFormatError(f"{self.path}: {exc}") from None
        return modules

    @property
    def metadata(self) -> dict[str, str]:
        return self.reader.metadata

    def shape(self, module: Module, part: str) -> tuple[int, ...]:
        return self.reader.infos[module.parts[part]].shape

    def tensors(self, module: Module) -> dict:
        return {part: self.reader.get(key) for part, key in module.parts.items()}

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def family_hint(lora: LoraFile) -> str | None:
    """The base family the file says it was trained for (sd1 / sd2 / sdxl), or None."""
    meta = lora.metadata or {}
    version = str(meta.get("ss_base_model_version", ""))
    arch = str(meta.get("modelspec.architecture", ""))
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or str(meta.get("ss_v2", "")).lower() == "true" or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if any(name.startswith(("lora_te1_", "lora_te2_")) for name in lora.modules):
        return "sdxl"
    return None
