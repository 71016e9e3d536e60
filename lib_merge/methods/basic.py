"""Linear merges (A1111 / supermerger semantics; α is B's share everywhere)."""
from __future__ import annotations

import torch

from ..errors import BadParameterError
from .params import ALPHA, BETA
from .registry import KeyContext, Param, merge_method


def _lerp_native(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> None:
    # torch.lerp on fp16/bf16 computes in fp32 internally and rounds once, exactly like the fp32
    # path followed by a cast (tests/test_methods.py checks the bits), with no fp32 temporaries.
    torch.lerp(a, b, alpha, out=out)


def _lerp_bounded(*, alpha: float) -> bool:
    return 0.0 <= alpha <= 1.0  # interpolation, not extrapolation


@merge_method("weighted_sum", inputs=("A", "B"), params=(ALPHA,), elementwise=True, native=_lerp_native,
              bounded=_lerp_bounded)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """A + α(B − A): linear interpolation; α is B's share (0 → A, 1 → B)."""
    return torch.lerp(a, b, alpha)


@merge_method("add_difference", inputs=("A", "B", "C"), params=(ALPHA,), elementwise=True)
def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """A + α(B − C): add what B learned relative to C (e.g. an inpainting or style delta) to A."""
    return a + alpha * (b - c)


@merge_method("triple_sum", inputs=("A", "B", "C"), params=(ALPHA, BETA), elementwise=True)
def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, ctx: KeyContext, alpha: float, beta: float) -> torch.Tensor:
    """(1 − α − β)A + αB + βC: three-way weighted sum (supermerger "Triple sum")."""
    return a + alpha * (b - a) + beta * (c - a)


@merge_method("sum_twice", inputs=("A", "B", "C"), params=(ALPHA, BETA), elementwise=True)
def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, ctx: KeyContext, alpha: float, beta: float) -> torch.Tensor:
    """(1 − β)[(1 − α)A + αB] + βC: weighted sum of A and B, then with C (supermerger "Sum Twice")."""
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


MODEL_WEIGHTS = Param(
    "model_weights",
    str,
    "",
    "comma-separated weight per model, e.g. '1,1,2' (empty = all equal); normalised to sum 1",
)


def parse_model_weights(text: str, n: int) -> list[float]:
    if not text.strip():
        return [1.0 / n] * n
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise BadParameterError(f"soup: model_weights={text!r} must be comma-separated numbers") from None
    if len(values) != n:
        raise BadParameterError(f"soup: model_weights has {len(values)} values for {n} models; give one per model")
    total = sum(values)
    if total == 0:
        raise BadParameterError("soup: model_weights sum to 0; give at least one non-zero weight")
    return [v / total for v in values]


@merge_method("soup", inputs=("A", "B"), params=(MODEL_WEIGHTS,), variadic=True, elementwise=True)
def soup(*models: torch.Tensor, ctx: KeyContext, model_weights: str) -> torch.Tensor:
    """Σ wᵢθᵢ / Σ wᵢ: weighted mean of N models (a "model soup"; Diffusion Soup averages shards)."""
    weights = parse_model_weights(model_weights, len(models))
    acc = models[0] * weights[0]
    for w, t in zip(weights[1:], models[1:]):
        acc.add_(t, alpha=w)
    return acc
