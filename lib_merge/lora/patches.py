"""Binding LoRA files to a checkpoint: every module mapped to its key(s) and checked against the
key's shape from the headers alone, before any tensor is read; a module that maps to nothing is
reported (count and first few), never silently dropped.

The result is, per checkpoint key, the list of patches that change it — which is all the planner
needs to know which keys a LoRA touches and what they cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..arch import ArchSpec, block_of
from ..errors import ArchitectureMismatchError
from .blockweights import lora_block_weights
from .delta import delta_shape
from .formats import LoraFile, Module, family_hint
from .keymap import Target, checkpoint_keymap, normalise

_FAMILY_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a merge, as the recipe records it."""

    path: str
    strength: float = 1.0
    weights: Any = None  # per-block strength factor (block-weight syntax, lbw:PRESET, LBW vector)
    sha256: str = ""


@dataclass(frozen=True)
class Patch:
    lora: LoraFile
    order: int  # (file index, module index) flattened: the fixed application order
    module: Module
    target: Target
    role: str  # "weight" | "bias"
    strength: float  # μ × the block's factor

    @property
    def multiplicative(self) -> bool:
        """Reads the current weight (IA3, DoRA): applied after every additive patch."""
        return self.role == "weight" and (self.module.kind == "ia3" or
                                          bool({"dora_scale", "magnitude"} & set(self.module.parts)))


@dataclass
class Binding:
    patches: dict[str, list[Patch]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def keys(self) -> set[str]:
        return set(self.patches)


def _bias_key(key: str) -> str:
    return key[: -len("in_proj_weight")] + "in_proj_bias" if key.endswith("in_proj_weight") \
        else key[: -len(".weight")] + ".bias"


def _fits(lora: LoraFile, module: Module, target: Target, shape: Sequence[int]) -> bool:
    shapes = {part: lora.shape(module, part) for part in module.parts}
    if target.rows is not None:
        shape = (target.rows[1] - target.rows[0],) + tuple(shape[1:])
    if target.transpose:
        shape = tuple(reversed(shape))
    if module.kind == "ia3":
        on_input = "on_input" in module.parts
        return math.prod(shapes["weight"]) == (shape[1] if on_input else shape[0])
    if module.kind == "norm":
        return math.prod(shapes["w_norm"]) == math.prod(shape)
    out_in = delta_shape(module.kind, shapes)
    want = (shape[0], math.prod(shape[1:]))
    if out_in == want:
        return True
    # a 4-channel conv_in delta on a 9-channel inpainting conv_in is zero-padded (A1111)
    return len(shape) == 4 and out_in is not None and out_in[0] == shape[0] and shape[1] == 9 \
        and out_in[1] == 4 * math.prod(shape[2:])


def bind(loras: Sequence[tuple[LoraFile, LoraSpec]], shapes: Mapping[str, Sequence[int]], arch: ArchSpec,
         policy: str) -> Binding:
    """Map every module of every LoRA onto ``shapes`` (the checkpoint's key → shape)."""
    table = checkpoint_keymap(shapes)
    sdxl = arch.name == "sdxl"
    binding = Binding()
    problems: list[str] = []
    for index, (lora, spec) in enumerate(loras):
        hint = family_hint(lora)
        if hint is not None and hint != arch.name and {hint, arch.name} != {"sd1", "sd2"}:
            raise ArchitectureMismatchError(
                f"LoRA {lora.path.name} was made for {_FAMILY_LABEL[hint]} but the checkpoint is {arch.label}; "
                "use a LoRA trained for this model family"
            )
        factors = lora_block_weights(spec.weights, arch)
        unmapped: list[str] = []
        misfit: list[str] = []
        for m_index, module in enumerate(lora.modules.values()):
            target = table.get(normalise(module.name, sdxl))
            if target is None:
                unmapped.append(module.name)
                continue
            if not _fits(lora, module, target, shapes[target.key]):
                misfit.append(f"{module.name} → {target.key} {list(shapes[target.key])}")
                continue
            strength = spec.strength * factors[block_of(arch, target.key, policy)]
            order = index * 1_000_000 + m_index
            roles = []
            if module.kind != "norm" or "w_norm" in module.parts:
                roles.append((target.key, "weight"))
            if {"diff_b", "b_norm"} & set(module.parts):
                roles.append((_bias_key(target.key), "bias"))
            for key, role in roles:
                if key in shapes:
                    binding.patches.setdefault(key, []).append(Patch(lora, order, module, target, role, strength))
        if misfit:
            problems.append(f"{lora.path.name}: {len(misfit)} module(s) do not fit their layer (e.g. {misfit[0]})")
        elif unmapped and len(unmapped) == len(lora.modules):
            problems.append(
                f"{lora.path.name}: none of its {len(unmapped)} modules names a layer of this {arch.label} "
                f"checkpoint (e.g. {unmapped[0]})"
            )
        elif unmapped:
            binding.warnings.append(
                f"LoRA {lora.path.name}: {len(unmapped)} module(s) match no layer of the checkpoint and are left out: "
                f"{', '.join(unmapped[:3])}{' …' if len(unmapped) > 3 else ''}"
            )
    if problems:
        raise ArchitectureMismatchError("; ".join(problems) + "; the LoRA was made for another architecture")
    for patches in binding.patches.values():
        patches.sort(key=lambda p: (p.multiplicative, p.order))
    return binding
