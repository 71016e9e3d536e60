"""Merging LoRAs into one (lora-reference.md §5).

Without a rank: exact concatenation along the rank axis, up = [ρ₁s₁U₁ | ρ₂s₂U₂ | …],
down = [D₁; D₂; …], α = R = Σrᵢ (s = 1), so baking the result equals Σρᵢ·bake(LoRAᵢ) exactly —
not kohya's ``--concat`` (which squares ρ and dilutes by rᵢ/R) nor a factor sum (cross terms).
With a rank: ΔW = Σρᵢsᵢ ΔWᵢ per module, re-compressed by SVD to rank R (any additive type).
DoRA and IA3 read the weight they patch, so they cannot be summed without a checkpoint: refused.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadParameterError
from .delta import delta_shape, scale, weight_delta
from .formats import LoraFile, family_hint
from .keymap import normalise
from .output import lora_metadata, write_lora
from .svd import factorize


@dataclass
class LoraMergeReport:
    path: Path
    modules: int
    ranks: list[int]
    retained: float  # Σ kept σ² / Σ ‖ΔW‖² over all modules (1 for concatenation)


def parse_weighted(ref: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]``; a Windows drive letter or a colon in the name is kept when no number follows."""
    head, sep, tail = ref.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return ref, 1.0


def _kernel(lora: LoraFile, module) -> tuple[int, ...]:
    parts = module.parts
    for part in ("lora_down.weight", "lora_mid.weight", "hada_t1", "lokr_t2", "lokr_w2", "diff"):
        if part in parts:
            shape = lora.shape(module, part)
            if len(shape) == 4:
                return tuple(shape[2:])
    return ()


def merge_loras(refs: Sequence[tuple[str, float]], output, *, rank: int | None = None, overwrite: bool = False,
                dtype: torch.dtype = torch.float16) -> LoraMergeReport:
    files = [LoraFile(path) for path, _ in refs]
    try:
        families = {family_hint(f) for f in files} - {None}
        if len(families) > 1:
            raise BadParameterError(f"the LoRAs are for different model families ({', '.join(sorted(families))})")
        family = families.pop() if families else "sd1"
        sdxl = family == "sdxl"
        groups: dict[str, list] = {}
        for index, lora in enumerate(files):
            for module in lora.modules.values():
                if module.kind in ("ia3", "norm") or {"dora_scale", "magnitude"} & set(module.parts):
                    raise BadParameterError(
                        f"{lora.path.name}: module {module.name} is {module.kind if module.kind != 'lora' else 'DoRA'}, "
                        "which rescales the weight it patches and cannot be merged without the checkpoint; bake it instead")
                groups.setdefault(normalise(module.name, sdxl), []).append((lora, module, refs[index][1]))
        tensors: dict[str, torch.Tensor] = {}
        ranks: list[int] = []
        kept_total = [0.0, 0.0]
        for name, members in sorted(groups.items()):
            if rank is None:
                up, down = _concat(name, members)
            else:
                up, down, kept, total = _recompress(name, members, rank)
                kept_total[0] += kept
                kept_total[1] += total
            tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
            ranks.append(down.shape[0])
        meta = lora_metadata(family, dims=ranks, title=Path(output).stem,
                             v_prediction=any(f.metadata.get("modelspec.prediction_type") == "v" for f in files),
                             extra={"lib_merge_lora_merge": repr([(os.path.basename(p), w) for p, w in refs]) +
                                    (f" rank {rank}" if rank else " concatenated")})
        path = write_lora(output, tensors, meta, overwrite=overwrite, inputs=[f.path for f in files])
        retained = 1.0 if rank is None or not kept_total[1] else kept_total[0] / kept_total[1]
        return LoraMergeReport(path, len(ranks), ranks, retained)
    finally:
        for f in files:
            f.close()


def _concat(name: str, members) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for lora, module, weight in members:
        if module.kind != "lora" or "lora_mid.weight" in module.parts:
            raise BadParameterError(
                f"{lora.path.name}: module {module.name} is {module.kind}{' (Tucker)' if module.kind == 'lora' else ''}; "
                "only plain LoRA/LoCon modules concatenate exactly — give --rank R to re-compress instead")
        parts = lora.tensors(module)
        s = scale("lora", parts, module.name)
        ups.append(parts["lora_up.weight"].float() * (weight * s))
        downs.append(parts["lora_down.weight"].float())
    if len({d.shape[1:] for d in downs}) > 1 or len({u.shape[0] for u in ups}) > 1:
        raise BadParameterError(f"module {name}: the LoRAs disagree on its shape ({[list(d.shape) for d in downs]})")
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _recompress(name: str, members, rank: int):
    total = None
    kernel: tuple[int, ...] = ()
    for lora, module, weight in members:
        kernel = kernel or _kernel(lora, module)
    for lora, module, weight in members:
        shapes = {p: lora.shape(module, p) for p in module.parts}
        out, rest = delta_shape(module.kind, shapes)
        target = (out, rest // math.prod(kernel), *kernel) if kernel and rest % math.prod(kernel) == 0 else (out, rest)
        parts = lora.tensors(module)
        d = weight_delta(module.kind, parts, target) * (weight * scale(module.kind, parts, module.name))
        if total is not None and total.shape != d.shape:
            raise BadParameterError(f"module {name}: the LoRAs disagree on its shape ({list(total.shape)} vs {list(d.shape)})")
        total = d if total is None else total.add_(d)
    f = factorize(total, rank)
    return f.up, f.down, f.kept, f.total
