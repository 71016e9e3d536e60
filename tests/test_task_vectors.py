"""Task-vector methods on small hand-computed tensors, their invariants, determinism, and the
AstolfoMix pipelines against a straightforward single-threaded reference written here."""
from __future__ import annotations

import math

import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.methods import KeyContext, get_method
from lib_merge.methods.sparsify import (
    ChunkContext,
    SMALL_SELECT,
    della_keep_probabilities,
    keep_salt,
    select_top,
    uniforms,
)

CTX = KeyContext("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "IN01", seed=7)


def run(name: str, *models: torch.Tensor, ctx: KeyContext = CTX, **params) -> torch.Tensor:
    spec = get_method(name)
    return spec.fn(*models, ctx=ctx, **spec.resolve_params(params))


BASE = torch.tensor([10.0, 20.0, 30.0, 40.0])


def fine_tunes(*deltas: list[float]) -> list[torch.Tensor]:
    return [BASE + torch.tensor(d) for d in deltas]


# -- TIES ------------------------------------------------------------------------------------------
def test_ties_sign_election_with_a_tie_sum_and_count():
    # per element: (+1, −1, 0) ties both votes; (+2, +1, −4): sum −1 → −, count 2:1 → +;
    # (−1, +3, 0): sum + , count tie; (0, 0, 0)
    models = fine_tunes([1, 2, -1, 0], [-1, 1, 3, 0], [0, -4, 0, 0])
    by_sum = run("ties", BASE, *models, k=1.0, vote="sum")
    by_count = run("ties", BASE, *models, k=1.0, vote="count")
    assert torch.equal(by_sum, BASE + torch.tensor([0.0, -4.0, 3.0, 0.0]))
    assert torch.equal(by_count, BASE + torch.tensor([0.0, 1.5, 0.0, 0.0]))


def test_ties_trim_keeps_fraction_k_by_magnitude_and_breaks_ties_by_position():
    (m,) = fine_tunes([4, -1, 3, -2])
    assert torch.equal(run("ties", BASE, m, k=0.5), BASE + torch.tensor([4.0, 0, 3, 0]))
    (flat,) = fine_tunes([1, 1, 1, 1])
    assert torch.equal(run("ties", BASE, flat, k=0.5), BASE + torch.tensor([0.0, 0, 1, 1]))


def test_ties_weights_and_alpha():
    models = fine_tunes([2, 2, 2, 2], [4, -2, 4, 0])
    out = run("ties", BASE, *models, k=1.0, task_weights="1,3", alpha=0.5)
    # agreeing elements: weighted mean (2·1 + 4·3)/4 = 3.5; element 1: sum vote 2 − 6 < 0 → −2; element 3: only 2
    assert torch.allclose(out, BASE + 0.5 * torch.tensor([3.5, -2.0, 3.5, 2.0]))
    with pytest.raises(BadParameterError, match="task_weights"):
        run("ties", BASE, *models, task_weights="1")
    for bad in ("nan,1", "1,inf"):  # a NaN weight would make the disjoint mean's count NaN
        with pytest.raises(BadParameterError, match="finite"):
            run("ties", BASE, *models, task_weights=bad)


def test_ties_soup_is_count_vote_disjoint_mean():
    models = fine_tunes([1, 2, -1, 0], [-1, 1, 3, 0], [0, -4, 0, 0])
    assert torch.equal(run("ties_soup", BASE, *models), BASE + torch.tensor([0.0, 1.5, 0.0, 0.0]))


@pytest.mark.parametrize("n", [1000, SMALL_SELECT * 2 + 13])
def test_top_selection_matches_stable_sort_ranks(n):
    g = torch.Generator().manual_seed(n)
    row = torch.randint(-50, 50, (n,), generator=g).float() / 7  # many equal magnitudes
    order = torch.sort(row.abs().view(torch.int32), stable=True).indices
    for m in (0, 1, n // 3, n - 1, n):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[n - m:]] = True
        sel = select_top(row, m)
        got = torch.cat([sel.mask(row, slice(s, min(n, s + 777))) for s in range(0, n, 777)])
        assert torch.equal(got, expected), m


# -- DARE / DELLA -----------------------------------------------------------------------------------
def test_dare_keeps_about_one_minus_p_and_rescale_preserves_the_mean():
    n = 200_000
    base = torch.zeros(n)
    delta = torch.ones(n)
    out = run("dare", base, delta, p=0.3, rescale=False)
    kept = float((out != 0).float().mean())
    assert abs(kept - 0.7) < 0.01
    rescaled = run("dare", base, delta, p=0.3, rescale=True)
    assert torch.equal(rescaled != 0, out != 0)  # the same draws
    assert abs(float(rescaled.mean()) - 1.0) < 0.015
    assert torch.allclose(rescaled[rescaled != 0], torch.full((1,), 1 / 0.7))


def test_dare_chunks_equal_the_whole_tensor():
    g = torch.Generator().manual_seed(1)
    models = [torch.randn(150_001, generator=g) for _ in range(3)]
    whole = run("dare", *models, p=0.5, vote="count")
    for size in (4096, 70_001):
        parts = []
        for start in range(0, 150_001, size):
            ctx = ChunkContext(CTX.key, CTX.block, CTX.seed, offset=start)
            parts.append(run("dare", *[m[start:start + size] for m in models], ctx=ctx, p=0.5, vote="count"))
        assert torch.equal(torch.cat(parts), whole)


def test_uniform_draws_do_not_depend_on_the_requested_length():
    # the RNG scheme relies on torch filling a tensor serially from the generator
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(1000, generator=g1)[:10], torch.rand(10, generator=g2))
    assert torch.equal(uniforms(CTX, "s", 65_530, 20), uniforms(CTX, "s", 0, 65_550)[65_530:])


def test_della_probabilities_follow_ordinal_ranks():
    row = torch.tensor([0.5, -0.1, 0.5, 2.0, 0.0])  # |.| ranks (ties by position): 3, 2, 4, 5, 1
    q = della_keep_probabilities(row.clone(), p=0.4, eps=0.2)
    n = 5
    expected = [0.6 + 0.2 * (r / n - (n + 1) / (2 * n)) for r in (3, 2, 4, 5, 1)]
    assert torch.allclose(q, torch.tensor(expected), atol=1e-7)


def test_della_negative_eps_keeps_small_magnitudes_more_often():
    n = 100_000
    g = torch.Generator().manual_seed(3)
    delta = (torch.rand(n, generator=g) + 0.01) * torch.sign(torch.randn(n, generator=g))
    small = delta.abs() < delta.abs().quantile(0.25)
    large = delta.abs() > delta.abs().quantile(0.75)
    out = run("della", torch.zeros(n), delta, p=0.5, eps=-0.8, rescale=False)
    kept = out != 0
    assert float(kept[small].float().mean()) > 0.75 and float(kept[large].float().mean()) < 0.25
    out = run("della", torch.zeros(n), delta, p=0.5, eps=0.8, rescale=False)
    assert float((out != 0)[large].float().mean()) > 0.75
    # kept values are untouched without rescale, divided by their own q with it
    assert torch.equal(out[out != 0], delta[out != 0])


def test_breadcrumbs_drops_outliers_and_small_values():
    delta = torch.arange(1.0, 11.0)
    out = run("breadcrumbs", torch.zeros(10), delta, k=0.5, gamma=0.1)
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 0, 5, 6, 7, 8, 9, 0]))


# -- model stock, task arithmetic, geometric median --------------------------------------------------
def test_model_stock_identical_task_vectors_give_their_mean():
    models = fine_tunes([1, -2, 3, 0.5], [1, -2, 3, 0.5], [1, -2, 3, 0.5])
    assert torch.allclose(run("model_stock", BASE, *models), models[0])


def test_model_stock_t_from_all_pairs():
    # Δ1 = e0, Δ2 = (e0 + √3·e1)/2: cos 0.5 → t = 2·0.5 / (1 + 0.5) = 2/3
    d1 = torch.tensor([1.0, 0, 0, 0])
    d2 = torch.tensor([0.5, math.sqrt(3) / 2, 0, 0])
    out = run("model_stock", BASE, BASE + d1, BASE + d2)
    assert torch.allclose(out, BASE + (2 / 3) * (d1 + d2) / 2, atol=1e-6)
    # orthogonal task vectors: cos 0 → the base
    assert torch.allclose(run("model_stock", BASE, BASE + d1, BASE + torch.tensor([0.0, 1, 0, 0])), BASE)


def test_task_arithmetic_adds_weighted_task_vectors():
    models = fine_tunes([1, 2, 3, 4], [-1, 0, 1, 0])
    out = run("task_arithmetic", BASE, *models, alpha=0.5, task_weights="2,1")
    assert torch.allclose(out, BASE + 0.5 * torch.tensor([1.0, 4, 7, 8]))


def test_geometric_median_of_points_on_a_line_is_their_median():
    v = torch.tensor([1.0, 2.0, -1.0, 0.5])
    points = [v * x for x in (0.0, 1.0, 2.0, 10.0, 100.0)]
    assert torch.allclose(run("geometric_median", *points), 2 * v, atol=1e-4)


def test_geometric_median_is_robust_to_one_outlier():
    g = torch.Generator().manual_seed(0)
    cluster = [torch.ones(64) + 0.01 * torch.randn(64, generator=g) for _ in range(6)]
    outlier = torch.full((64,), 1e6)
    out = run("geometric_median", *cluster, outlier)
    assert float((out - 1).abs().max()) < 0.05
    assert float(torch.stack(cluster + [outlier]).mean(0).min()) > 1e5  # the mean is not


# -- determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dgmla", "geometric_median", "ties", "model_stock"])
def test_whole_tensor_methods_do_not_depend_on_torch_threads(name):
    g = torch.Generator().manual_seed(11)
    models = [torch.randn(300_000, generator=g) for _ in range(4)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(name, *models)
        torch.set_num_threads(2)
        two = run(name, *models)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_seeds_are_per_key():
    models = [torch.zeros(1000), torch.ones(1000)]
    a = run("dare", *models, ctx=KeyContext("a", seed=1), p=0.5)
    b = run("dare", *models, ctx=KeyContext("b", seed=1), p=0.5)
    c = run("dare", *models, ctx=KeyContext("a", seed=2), p=0.5)
    again = run("dare", *models, ctx=KeyContext("a", seed=1), p=0.5)
    assert torch.equal(a, again) and not torch.equal(a, b) and not torch.equal(a, c)


# -- the AstolfoMix pipelines against a plain reference ---------------------------------------------
def reference_pipeline(base, models, ctx, *, p, della_eps, maxiter=100, eps=1e-6, ftol=1e-20):
    """Straightforward single-threaded TGMD/DGMLA: stack, mask, vote, Weiszfeld over a list of
    points in float64 (sd-mecha's loop), base added at α = 1."""
    base = base.float().reshape(-1)
    n = base.numel()
    masked = []
    for i, m in enumerate(models, start=1):
        delta = m.float().reshape(-1) - base
        if della_eps:
            rank = torch.empty(n, dtype=torch.float64)
            rank[torch.argsort(delta.abs(), stable=True)] = torch.arange(1, n + 1, dtype=torch.float64)
            q = ((1 - p) + della_eps * (rank / n - (n + 1) / (2 * n))).float().clamp(0, 1)
        else:
            q = torch.full((n,), 1 - p)
        keep = uniforms(ctx, keep_salt(i), 0, n) < q
        masked.append(delta * keep)
    stacked = torch.stack(masked)
    elected = torch.sign(torch.sign(stacked).sum(0))
    stacked = stacked * (torch.sign(stacked) == elected)
    points = [torch.zeros(n, dtype=torch.float64)] + [row.double() for row in stacked]  # the base is a point

    def average(weights):
        return sum(w * x for w, x in zip(weights, points)) / sum(weights)

    def objective(m):
        return sum(float(torch.dist(x, m)) for x in points) / len(points)

    median = average([1.0] * len(points))
    value = objective(median)
    for _ in range(maxiter):
        weights = [1.0 / max(float(torch.dist(x, median)), eps) for x in points]
        median = average(weights)
        new = objective(median)
        if abs(value - new) <= ftol * new:
            break
        value = new
    return (base.double() + median).float()


@pytest.mark.parametrize("name, della_eps", [("tgmd", 0.0), ("dgmla", -0.1)])
def test_pipelines_match_the_reference(name, della_eps):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(70, 41, generator=g)
    models = [base + 0.05 * torch.randn(70, 41, generator=g) for _ in range(6)]
    ctx = KeyContext("conditioner.some.weight", "BASE", seed=241011)
    params = {"p": 0.1} if name == "tgmd" else {"p": 0.1, "della_eps": della_eps}
    out = run(name, base, *models, ctx=ctx, **params)
    expected = reference_pipeline(base, models, ctx, p=0.1, della_eps=della_eps).view(70, 41)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    unchanged = float(((out - base) == 0).float().mean())
    assert 0.05 < unchanged < 0.5  # tied count votes (3:3 of 6 random signs) leave A; most entries move


def test_dgmla_through_the_engine_matches_the_reference(tmp_path):
    from lib_merge.engine import merge
    from lib_merge.io.reader import open_checkpoint
    from lib_merge.recipe import Recipe

    from _slim import write_slim_unet

    paths = [write_slim_unet(tmp_path / f"m{i}.safetensors", model=i, family=12) for i in range(4)]
    out = tmp_path / "dgmla.safetensors"
    merge(Recipe("dgmla", tuple(map(str, paths)), seed=241011, dtype="fp32"), out, hash_inputs=False, threads=3)
    readers = [open_checkpoint(p) for p in paths]
    with open_checkpoint(out) as merged:
        for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.output_blocks.3.0.in_layers.2.weight"):
            ctx = KeyContext(key, "", seed=241011)
            expected = reference_pipeline(readers[0].get(key), [r.get(key) for r in readers[1:]], ctx, p=0.1, della_eps=-0.1)
            assert torch.allclose(merged.get(key).reshape(-1), expected, rtol=1e-5, atol=1e-6), key
    for r in readers:
        r.close()
