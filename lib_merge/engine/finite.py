"""The NaN/Inf refusal: a fast finiteness check, and messages that name who is to blame — a
damaged input (re-download it) or the method and its parameters (change them)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..io.dtypes import FP8

from ..io.reader import CheckpointReader
from ..plan import KeyJob, MergePlan, model_label

if TYPE_CHECKING:
    from ..many import SourceHandle


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check via min/max: NaN propagates through both and ±Inf shows up in one of them;
    a vectorised reduction, ~40× faster than ``isfinite().all()`` on fp16 CPU tensors."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in FP8:  # no min/max kernels for fp8; fp16 holds every fp8 value exactly
        t = t.to(torch.float16)
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def source_label(plan: MergePlan, index: int) -> str:
    """'A (a.safetensors)', or 'VAE (x.safetensors)' for a baked VAE (an input after the models)."""
    source = plan.inputs[index]
    if index >= len(plan.recipe.models):
        return f"VAE ({source.path.name if isinstance(source, CheckpointReader) else source})"
    return model_label(index, source)


def non_finite_message(plan: MergePlan, job: KeyJob, tensors: list[torch.Tensor]) -> str:
    culprits = [
        model_label(index, plan.inputs[index])
        for index, t in zip(job.sources, tensors)
        if not all_finite(t)
    ]
    if culprits:
        return (
            f"{job.key}: NaN/Inf in input {', '.join(culprits)}; that checkpoint is damaged — "
            "re-download it or leave it out of the merge"
        )
    return (
        f"{job.key}: method {plan.method.name} produced NaN/Inf with {job.params}; "
        f"try smaller ratios or a {'wider' if job.out_dtype == torch.float16 else 'different'} output dtype"
    )


def non_finite_message_lazy(plan: MergePlan, job: KeyJob, handles: list[SourceHandle]) -> str:
    """As ``non_finite_message``, for methods that map their inputs one at a time."""
    culprits = []
    for index, handle in zip(job.sources, handles):
        if not all_finite(handle.load()):
            culprits.append(model_label(index, plan.inputs[index]))
    if culprits:
        return (
            f"{job.key}: NaN/Inf in input {', '.join(culprits)}; that checkpoint is damaged — "
            "re-download it or leave it out of the merge"
        )
    return f"{job.key}: method {plan.method.name} produced NaN/Inf with {job.params}"
