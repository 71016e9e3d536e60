"""Task-vector methods: task_arithmetic, ties, dare, della, breadcrumbs, model_stock,
geometric_median — each a configuration of the core in ``task_vector.py``.

Roles everywhere: model A is the base, B, C, … are fine-tunes of it, Δᵢ = θᵢ − A, and the
result is A + α·τ (α per block; α = 0 gives A). Each docstring states exactly what is computed
and where sd-mecha and mergekit mean something else by the same name.
"""
from __future__ import annotations

import torch

from .median import Weiszfeld
from .registry import KeyContext, Param, merge_method
from .task_vector import (
    TaskVectorConfig,
    chunk_copies,
    lazy_inputs,
    merge_chunk,
    merge_task_vectors,
    parse_task_weights,
    task_chunk_copies,
    working_copies,
)

TV_ALPHA = Param(
    "alpha",
    float,
    1.0,
    "λ: scale of the merged task vector τ added to the base A (result A + α·τ; 0 gives A); per block with --weights",
    per_block=True,
)
TASK_WEIGHTS = Param(
    "task_weights",
    str,
    "",
    "comma-separated weight wᵢ per fine-tune (models B, C, …), NOT normalised; empty = 1 each",
)
KEEP_K = Param("k", float, 0.2, "fraction of each task vector's entries KEPT (largest |Δ|, whole tensor); 1 = no trim", 0.0, 1.0)
DROP_P = Param("p", float, 0.9, "DROP rate: probability that an entry of a task vector is zeroed (keep q = 1 − p)", 0.0, 1.0)
RESCALE = Param("rescale", bool, True, "divide kept entries by their keep probability (unbiased); off = 'DROP'")
VOTE_SUM_COUNT = Param(
    "vote", str, "sum", "sign election: sum = sign(Σ wᵢΔᵢ) (TIES paper), count = sign(Σ sign Δᵢ) (majority of models)",
    choices=("sum", "count"),
)
VOTE_OPTIONAL = Param(
    "vote", str, "none", "none = add the sparse task vectors (Σ wᵢΔᵢ); sum | count = TIES sign election + disjoint mean",
    choices=("none", "sum", "count"),
)
MEDIAN_EPS = Param("eps", float, 1e-6, "Weiszfeld: distances below eps count as eps (no division by zero)", 0.0, None)
MAXITER = Param("maxiter", int, 100, "Weiszfeld: most reweighting updates", 0, 100000)
FTOL = Param("ftol", float, 1e-20, "Weiszfeld: stop when |Δobjective| ≤ ftol·objective", 0.0, None)


def _weights(models: tuple, task_weights: str, name: str, *, non_negative: bool) -> torch.Tensor:
    return parse_task_weights(task_weights, len(models) - 1, name, non_negative=non_negative)


# -- elementwise configurations ------------------------------------------------------------------
@merge_method("task_arithmetic", inputs=("A", "B"), params=(TV_ALPHA, TASK_WEIGHTS), variadic=True, elementwise=True,
              reference="https://arxiv.org/abs/2212.04089")
@chunk_copies(task_chunk_copies)
def task_arithmetic(*models: torch.Tensor, ctx: KeyContext, alpha: float, task_weights: str) -> torch.Tensor:
    """A + α·Σ wᵢ(θᵢ − A): task arithmetic (Ilharco et al. 2023). A is the base; B, C, … are
    fine-tunes with weights wᵢ (task_weights, 1 each by default and NOT normalised: two task
    vectors at weight 1 are both added in full). Same as mergekit `task_arithmetic` (normalize
    off, λ = α); sd-mecha spells it as a chain of add_difference."""
    weights = _weights(models, task_weights, "task_arithmetic", non_negative=False)
    return merge_chunk(models[0], models[1:], ctx=ctx, config=TaskVectorConfig(), alpha=alpha, weights=weights)


@merge_method("dare", inputs=("A", "B"), params=(TV_ALPHA, DROP_P, RESCALE, VOTE_OPTIONAL, TASK_WEIGHTS), variadic=True,
              elementwise=True, random=True, reference="https://arxiv.org/abs/2311.03099")
@chunk_copies(task_chunk_copies)
def dare(*models: torch.Tensor, ctx: KeyContext, alpha: float, p: float, rescale: bool, vote: str, task_weights: str) -> torch.Tensor:
    """DARE (Yu et al. 2024): A + α·τ. Each entry of every Δᵢ = θᵢ − A is zeroed with
    probability p — p is the DROP rate, q = 1 − p of the entries survive — and with rescale the
    survivors are divided by q (so E[Δ̃] = Δ). vote=none: τ = Σ wᵢΔ̃ᵢ (task arithmetic, as the
    paper); vote=sum|count: TIES sign election and disjoint mean (mergekit `dare_ties`).
    One uniform per element from a generator seeded by hash(seed, key, model, block of 65536
    elements): independent of threads and chunking.
    Differs from mergekit: its `density` is q, not p, and its rescale matches the L1 norm of Δ
    instead of dividing by q; `dare_linear` normalises by Σw. From sd-mecha: same p, but its
    `rescale` is an exponent (divide by (1 − p)^rescale) and one generator, seeded with the
    recipe seed, is shared by every key and model."""
    weights = _weights(models, task_weights, "dare", non_negative=vote != "none")
    config = TaskVectorConfig(drop="dare", p=p, rescale=rescale, vote=vote, combine="mean" if vote != "none" else "sum")
    return merge_chunk(models[0], models[1:], ctx=ctx, config=config, alpha=alpha, weights=weights)


# -- whole-tensor configurations -----------------------------------------------------------------
def _run(models: tuple, ctx: KeyContext, config: TaskVectorConfig, alpha: float, weights: torch.Tensor) -> torch.Tensor:
    return merge_task_vectors(models[0], models[1:], ctx=ctx, config=config, alpha=alpha, weights=weights)


_TIES = TaskVectorConfig(trim="top", vote="sum", combine="mean")


@merge_method("ties", inputs=("A", "B"), params=(TV_ALPHA, KEEP_K, VOTE_SUM_COUNT, TASK_WEIGHTS), variadic=True,
              reference="https://arxiv.org/abs/2306.01708")
@lazy_inputs(lambda n: working_copies(_TIES, n - 1))
def ties(*models, ctx: KeyContext, alpha: float, k: float, vote: str, task_weights: str) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): A + α·τ. Per fine-tune Δᵢ = θᵢ − A keep the round(k·n)
    largest |Δᵢ| of the whole tensor (k is the KEPT fraction; equal magnitudes: later elements
    first); elect a sign per element — vote=sum: sign(Σ wᵢΔᵢ) (the paper), vote=count:
    sign(Σ sign Δᵢ) — and zero the entries that disagree; a tie elects 0 and leaves A there;
    τ = disjoint mean Σ_agree wᵢΔᵢ / Σ_agree wᵢ.
    Differs from mergekit: `density` = k, but a zero vote counts as + there, and `normalize`
    can be switched off. From sd-mecha: `ties_sum` keeps |Δ| ≥ the kthvalue threshold (one more
    entry than k·n, plus all ties); in sd-mecha ≥ 0.1 `vote_sgn=True` is the sum vote, in 0.0.x
    `vote_sgn>0` was the count vote."""
    weights = _weights(models, task_weights, "ties", non_negative=True)
    return _run(models, ctx, TaskVectorConfig(trim="top", k=k, vote=vote, combine="mean"), alpha, weights)


_DELLA = TaskVectorConfig(drop="della")


@merge_method("della", inputs=("A", "B"),
              params=(TV_ALPHA, Param("p", float, 0.5, DROP_P.help, 0.0, 1.0),
                      Param("eps", float, 0.2, "rank window: keep probability runs from (1−p) − eps/2 (smallest |Δ|) to "
                            "(1−p) + eps/2 (largest); eps < 0 drops LARGE magnitudes more", -2.0, 2.0),
                      RESCALE, VOTE_OPTIONAL, TASK_WEIGHTS),
              variadic=True, random=True, reference="https://arxiv.org/abs/2406.11617")
@lazy_inputs(lambda n: working_copies(_DELLA, n - 1))
def della(*models, ctx: KeyContext, alpha: float, p: float, eps: float, rescale: bool, vote: str, task_weights: str) -> torch.Tensor:
    """DELLA / MagPrune (Deep et al. 2024): dare with rank-aware keep probabilities. Entry j of
    Δᵢ is kept with qⱼ = (1 − p) + eps·(rⱼ/n − (n+1)/(2n)), clamped to [0, 1], where rⱼ is the
    ordinal rank (1…n, ties by position) of |Δⱼ| over the WHOLE tensor, as sd-mecha ranks — so
    q spans (1 − p) ± eps/2. eps > 0 keeps large magnitudes more; eps < 0 keeps small ones more
    (the AstolfoMix DGMLA setting). rescale divides each survivor by its own qⱼ (the paper).
    vote as in dare.
    Differs from mergekit: it ranks per row, its epsilon spans (density ± epsilon) and must keep
    that inside (0, 1), and it rescales to the L1 norm; `della` has the sum vote, `della_linear`
    none. From sd-mecha: its `della_eps` is our eps (same window), but it rescales by 1/(1 − p)."""
    weights = _weights(models, task_weights, "della", non_negative=vote != "none")
    config = TaskVectorConfig(drop="della", p=p, della_eps=eps, rescale=rescale, vote=vote,
                              combine="mean" if vote != "none" else "sum")
    return _run(models, ctx, config, alpha, weights)


_BAND = TaskVectorConfig(trim="band")


@merge_method("breadcrumbs", inputs=("A", "B"),
              params=(TV_ALPHA, Param("k", float, 0.9, KEEP_K.help, 0.0, 1.0),
                      Param("gamma", float, 0.01, "fraction of the LARGEST |Δ| removed as outliers", 0.0, 1.0),
                      VOTE_OPTIONAL, TASK_WEIGHTS),
              variadic=True, reference="https://arxiv.org/abs/2312.06795")
@lazy_inputs(lambda n: working_copies(_BAND, n - 1))
def breadcrumbs(*models, ctx: KeyContext, alpha: float, k: float, gamma: float, vote: str, task_weights: str) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): A + α·τ. Per Δᵢ remove the round(gamma·n)
    largest |Δ| (outliers) and keep the next round(k·n) largest, zeroing the small rest (whole
    tensor, ordinal ranks; if gamma + k > 1 fewer outliers go so that k·n remain, as in
    mergekit). Then vote=none: τ = Σ wᵢΔ̃ᵢ (mergekit `breadcrumbs`, normalize off);
    sum|count: TIES election and disjoint mean (`breadcrumbs_ties`). k = mergekit's density."""
    weights = _weights(models, task_weights, "breadcrumbs", non_negative=vote != "none")
    config = TaskVectorConfig(trim="band", k=k, gamma=gamma, vote=vote, combine="mean" if vote != "none" else "sum")
    return _run(models, ctx, config, alpha, weights)


_STOCK = TaskVectorConfig(combine="stock")


@merge_method("model_stock", inputs=("A", "B", "C"),
              params=(TV_ALPHA, Param("cos_eps", float, 1e-6, "floor of ‖Δᵢ‖·‖Δⱼ‖ in the cosine", 0.0, None)),
              variadic=True, reference="https://arxiv.org/abs/2403.19522")
@lazy_inputs(lambda n: working_copies(_STOCK, n - 1))
def model_stock(*models, ctx: KeyContext, alpha: float, cos_eps: float) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): A + α·t·mean(Δᵢ), t = P·cosθ / (1 + (P − 1)·cosθ), P the
    number of fine-tunes (≥ 2) and cosθ the mean cosine similarity over ALL pairs of task
    vectors (each whole tensor flattened), as the paper, clamped to [0, 1] so that t ∈ [0, 1]
    (between A and the plain average; identical task vectors give their mean).
    Differs from mergekit: all pairs too, but no clamp (cosθ < 0 extrapolates and
    cosθ = −1/(P−1) divides by zero), optional per-row cosines. From sd-mecha: it uses only
    consecutive pairs (i, i+1), per row along the last dimension, and returns t·mean(Δ)
    (n_model_stock adds the base)."""
    return _run(models, ctx, TaskVectorConfig(combine="stock", cos_eps=cos_eps), alpha,
                torch.ones(len(models) - 1, dtype=torch.float64))


_MEDIAN = TaskVectorConfig(combine="median")


@merge_method("geometric_median", inputs=("A", "B"),
              params=(TV_ALPHA, MEDIAN_EPS, MAXITER, FTOL,
                      Param("include_base", bool, True, "count A itself as one (zero) task vector, i.e. a point of the median"),
                      TASK_WEIGHTS),
              variadic=True, reference="https://github.com/krishnap25/geom_median")
@lazy_inputs(lambda n: working_copies(_MEDIAN, n - 1))
def geometric_median(*models, ctx: KeyContext, alpha: float, eps: float, maxiter: int, ftol: float, include_base: bool,
                     task_weights: str) -> torch.Tensor:
    """Geometric median (Weiszfeld): A + α·τ, τ = the point minimising Σ wᵢ‖Δᵢ − τ‖ over the
    task vectors of B, C, … and, with include_base (default), A itself as a zero vector of
    weight 1 — so at α = 1 the result is the geometric median of all the given models (sd-mecha's
    geometric_median). Each model's whole tensor for a key is one point. Start at the weighted
    mean; update wᵢ/max(‖Δᵢ − τ‖, eps) until |Δobjective| ≤ ftol·objective or maxiter updates.
    Deterministic: no randomness, one thread per key, distances summed in fp64 over fixed
    chunks, computed chunk by chunk (memory: the P task vectors of one key in fp32)."""
    weights = _weights(models, task_weights, "geometric_median", non_negative=True)
    config = TaskVectorConfig(combine="median", include_base=include_base, median=Weiszfeld(eps, maxiter, ftol))
    return _run(models, ctx, config, alpha, weights)
