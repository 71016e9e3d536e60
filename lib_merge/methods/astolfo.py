"""The AstolfoMix-XL pipelines (6DammK9) as named methods, with the semantics of the author's
original runs: sd-mecha 0.0.x (the fork's commits 01823a9 and 6e545a3), where ``vote_sgn > 0``
selected the COUNT vote and ``apply_stock = 0`` meant no Model Stock factor — the 0.1 rewrite
inverted both flags, so the published recipes run unchanged on sd-mecha ≥ 0.1 compute something
else.

The original recipes listed the base among the models, so the base was one (zero) task vector
of the pool ("216 models" = 215 fine-tunes + base). Here A is the base and is counted that way
automatically: list each fine-tune once, after A, and not A again.

What cannot be reproduced bit for bit: sd-mecha seeded one generator per key with the recipe
seed (240603 for TGMD, 241011 for DGMLA) and drew the models' masks from it in sequence; our
masks come from hash(seed, key, model, block), so they differ element by element but not in
distribution.
"""
from __future__ import annotations

import torch

from .median import Weiszfeld
from .registry import KeyContext, Param, merge_method
from .task_methods import FTOL, MAXITER, MEDIAN_EPS, TV_ALPHA
from .task_vector import (TaskVectorConfig, chunk_copies, lazy_inputs, merge_chunk, merge_task_vectors,
                          task_chunk_copies, working_copies)

_SOUP = TaskVectorConfig(vote="count", combine="mean")


@merge_method("ties_soup", inputs=("A", "B"), params=(TV_ALPHA,), variadic=True, elementwise=True)
@chunk_copies(task_chunk_copies)
def ties_soup(*models: torch.Tensor, ctx: KeyContext, alpha: float) -> torch.Tensor:
    """AstolfoMix TIES-SOUP: A + α·τ, τ = disjoint mean of the task vectors Δᵢ = θᵢ − A over the
    entries whose sign agrees with the COUNT vote sign(Σ sign Δᵢ); no trim (k = 1), no drop,
    equal weights; a tied vote leaves A. = sd-mecha 0.0.x ties_sum(k=1, vote_sgn=1) added at
    α = 1 (on sd-mecha ≥ 0.1 that is vote_sgn=False). Elementwise, so it streams; the base as a
    zero task vector changes nothing (zeros neither vote nor count)."""
    weights = torch.ones(len(models) - 1, dtype=torch.float64)
    return merge_chunk(models[0], models[1:], ctx=ctx, config=_SOUP, alpha=alpha, weights=weights)


def _pipeline(models: tuple, ctx: KeyContext, config: TaskVectorConfig, alpha: float) -> torch.Tensor:
    weights = torch.ones(len(models) - 1, dtype=torch.float64)
    return merge_task_vectors(models[0], models[1:], ctx=ctx, config=config, alpha=alpha, weights=weights)


_TGMD = TaskVectorConfig(drop="dare", vote="count", combine="median", include_base=True)


@merge_method("tgmd", inputs=("A", "B"),
              params=(TV_ALPHA, Param("p", float, 0.1, "DROP rate of each task vector entry (no rescale)", 0.0, 1.0),
                      MEDIAN_EPS, MAXITER, FTOL),
              variadic=True, random=True)
@lazy_inputs(lambda n: working_copies(_TGMD, n - 1))
def tgmd(*models, ctx: KeyContext, alpha: float, p: float, eps: float, maxiter: int, ftol: float) -> torch.Tensor:
    """AstolfoMix TGMD ("TIES-GeometricMedian w/ DROP"), as the original runs (sd-mecha 0.0.x
    ties_sum_with_dropout with probability=0.1, rescale=0, k=1, vote_sgn=1, apply_median=1):
    every Δᵢ = θᵢ − A keeps each entry with probability 1 − p (p = 0.1 drop, NO rescale:
    "DROP"); the COUNT vote sign(Σ sign Δᵢ) zeroes disagreeing entries (a tie zeroes all);
    τ = Weiszfeld geometric median of the masked task vectors with A itself as one zero task
    vector (eps 1e-6, maxiter 100, ftol 1e-20); result A + α·τ, α = 1."""
    config = TaskVectorConfig(drop="dare", p=p, vote="count", combine="median", include_base=True,
                              median=Weiszfeld(eps, maxiter, ftol))
    return _pipeline(models, ctx, config, alpha)


_DGMLA = TaskVectorConfig(drop="della", vote="count", combine="median", include_base=True)


@merge_method("dgmla", inputs=("A", "B"),
              params=(TV_ALPHA, Param("p", float, 0.1, "DROP rate at the middle rank (no rescale)", 0.0, 1.0),
                      Param("della_eps", float, -0.1, "DELLA rank window: keep probability (1−p) ± della_eps/2 from "
                            "smallest to largest |Δ|; negative drops large magnitudes more", -2.0, 2.0),
                      MEDIAN_EPS, MAXITER, FTOL),
              variadic=True, random=True)
@lazy_inputs(lambda n: working_copies(_DGMLA, n - 1))
def dgmla(*models, ctx: KeyContext, alpha: float, p: float, della_eps: float, eps: float, maxiter: int, ftol: float) -> torch.Tensor:
    """AstolfoMix DGMLA ("Drop w/ GeoMedian and LA", modified from DELLA), as the original runs
    (sd-mecha 0.0.x ties_sum_with_dropout with probability=0.1, della_eps=-0.1, rescale=0, k=1,
    vote_sgn=1, apply_median=1): tgmd with DELLA's rank-aware keep probabilities
    qⱼ = (1 − p) + della_eps·(rⱼ/n − (n+1)/(2n)), rⱼ the ordinal rank of |Δⱼ| over the whole
    tensor — with p = 0.1, della_eps = −0.1: ≈ 0.95 for the smallest |Δ| down to ≈ 0.85 for the
    largest; no rescale; then the COUNT vote, the geometric median with A as one zero task
    vector, and A + α·τ (α = 1)."""
    config = TaskVectorConfig(drop="della", p=p, della_eps=della_eps, vote="count", combine="median", include_base=True,
                              median=Weiszfeld(eps, maxiter, ftol))
    return _pipeline(models, ctx, config, alpha)
