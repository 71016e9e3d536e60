"""Baking: one checkpoint key's fp32 tensor plus every patch that targets it, in place — the
additive patches (LoRA, LoCon, LoHa, LoKr, full) in file order, then those that read the current
weight (IA3, DoRA) in file order (lora-reference.md §5). One rounding happens later, at the
output cast."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import MergeError
from .delta import dora_apply, ia3_apply, pad_inpaint, scale, weight_delta
from .patches import Patch


def _view(w: torch.Tensor, patch: Patch) -> torch.Tensor:
    rows = patch.target.rows
    view = w[rows[0]: rows[1]] if rows is not None else w
    return view.t() if patch.target.transpose else view


def module_delta(patch: Patch, parts: dict, shape: tuple[int, ...]) -> torch.Tensor | None:
    """s·ΔW of a patch's module for a weight of ``shape`` (fp32), or None (IA3, norm)."""
    kind = patch.module.kind
    if kind == "norm":
        return parts["w_norm"].float().reshape(shape) if "w_norm" in parts else None
    if len(shape) == 4 and shape[1] == 9 and kind != "ia3":
        narrow = (shape[0], 4) + tuple(shape[2:])
        try:
            d = weight_delta(kind, parts, narrow)
        except MergeError:
            d = None
        if d is not None:
            return pad_inpaint(d, shape).mul_(scale(kind, parts, patch.module.name))
    d = weight_delta(kind, parts, shape)
    return None if d is None else d.mul_(scale(kind, parts, patch.module.name))


def apply_patches(w: torch.Tensor, patches: Sequence[Patch]) -> torch.Tensor:
    """Apply ``patches`` (already in application order) to the fp32 tensor ``w`` in place."""
    for patch in patches:
        parts = patch.lora.tensors(patch.module)
        view = _view(w, patch)
        if patch.role == "bias":
            delta = parts.get("diff_b", parts.get("b_norm"))
            view.add_(delta.float().reshape(view.shape), alpha=patch.strength)
            continue
        if patch.module.kind == "ia3":
            ia3_apply(view, parts, patch.strength)
            continue
        shape = tuple(view.shape)
        delta = module_delta(patch, parts, shape)
        magnitude = parts.get("dora_scale", parts.get("magnitude"))
        if magnitude is not None:
            dora_apply(view, delta, magnitude, patch.strength)
        else:
            view.add_(delta, alpha=patch.strength)
    return w
