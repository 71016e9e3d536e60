"""The streamed rewrites of slerp/bislerp, the TIES/breadcrumbs selection, DELLA's ranks and
train_difference against verbatim copies of the whole-tensor implementations they replaced (kept
here as references), on awkward inputs: odd lengths, many equal magnitudes, zeros and −0.0,
fp16-derived task vectors. Everything but slerp's fp64 reductions must match bit for bit."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from lib_merge.methods import KeyContext, get_method
from lib_merge.methods import sparsify
from lib_merge.methods.spherical import slerp_tensors

CTX = KeyContext("model.diffusion_model.out.2.weight", "OUT", 7)


# -- references: the implementations before the streamed rewrite (verbatim) -------------------------
PARALLEL_DOT = 0.9995


def ref_slerp_tensors(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a_flat, b_flat = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = a_flat.norm(), b_flat.norm()
    if na == 0 or nb == 0:
        return torch.lerp(a, b, t)
    dot = float(torch.dot(a_flat / na, b_flat / nb).clamp(-1.0, 1.0))
    if abs(dot) > PARALLEL_DOT:
        return torch.lerp(a, b, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    wa = math.sin((1.0 - t) * theta) / sin_theta
    wb = math.sin(t * theta) / sin_theta
    norm = float((1.0 - t) * na + t * nb)
    direction = (a / float(na)) * wa + (b / float(nb)) * wb
    return direction * norm


def ref_train_difference(a, b, c, alpha):
    delta = b - c
    dist_a = (b - a).abs()
    scale = dist_a / (dist_a + delta.abs())
    scale = torch.nan_to_num(scale, nan=0.0)
    return a + (1.8 * alpha) * delta * scale


@dataclass(frozen=True)
class RefTopSelection:
    threshold: int
    cut: int

    def mask(self, row, part):
        keys = row[part].abs().view(torch.int32)
        selected = keys > self.threshold
        if part.stop > self.cut:
            tail = torch.arange(part.start, part.stop) >= self.cut
            selected |= (keys == self.threshold) & tail
        return selected


def ref_select_top(row: torch.Tensor, m: int) -> RefTopSelection:
    """The m largest |row| by ordinal rank, from one stable sort (the definition)."""
    n = row.numel()
    if m <= 0:
        return RefTopSelection(0x7FFFFFFF, 1 << 62)
    if m >= n:
        return RefTopSelection(-1, 0)
    keys, order = torch.sort(row.abs().view(torch.int32), stable=True)
    threshold = int(keys[n - m])
    equal = keys == threshold
    # the kept equal elements are the last ones in flat order; cut = the first of them
    first_equal = int(torch.nonzero(equal)[0])
    if n - m <= first_equal:
        return RefTopSelection(threshold, 0)
    return RefTopSelection(threshold, int(order[n - m]))


def ref_trim_top_(row, k):
    n = row.numel()
    m = int(k * n + 0.5)
    if m >= n:
        return row
    selection = ref_select_top(row, m)
    row.mul_(selection.mask(row, slice(0, n)))
    return row


def ref_trim_band_(row, k, gamma):
    n = row.numel()
    m = int(k * n + 0.5)
    top = int(gamma * n + 0.5)
    if top + m > n:
        top = n - m
    upper = ref_select_top(row, top + m)
    outliers = ref_select_top(row, top)
    whole = slice(0, n)
    row.mul_(upper.mask(row, whole) & ~outliers.mask(row, whole))
    return row


def ref_della_keep_probabilities(row, p, eps):
    n = row.numel()
    keys = row.abs()
    bits = keys.view(torch.int32)
    order = torch.empty(n, dtype=torch.int64)
    torch.sort(bits, stable=True, out=(bits, order))
    q = keys
    for part in sparsify.chunks(n):
        ranks = torch.arange(part.start + 1, part.stop + 1, dtype=torch.float64)
        values = (ranks / n - (n + 1) / (2 * n)).mul_(eps).add_(1.0 - p).clamp_(0.0, 1.0)
        q[order[part]] = values.to(torch.float32)
    return q


def ref_della_drop_(row, *, ctx, model_index, p, eps, rescale):
    n = row.numel()
    if n == 0:
        return row
    q = ref_della_keep_probabilities(row, p, eps)
    salt = sparsify.keep_salt(model_index)
    for part in sparsify.chunks(n, sparsify.RNG_BLOCK):
        qs = q[part]
        keep = sparsify.uniforms(ctx, salt, part.start, part.stop - part.start) < qs
        seg = row[part]
        seg.mul_(keep)
        if rescale:
            seg.div_(torch.where(keep, qs, torch.ones_like(qs)))
    return row


# -- awkward inputs -----------------------------------------------------------------------------------
def awkward(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    if kind == "randn":
        x = torch.randn(n, generator=g)
    elif kind == "fp16":  # a fine-tune minus its base, both stored in fp16: few distinct magnitudes
        base = torch.randn(n, generator=g).half()
        x = (base.float() + 0.01 * torch.randn(n, generator=g)).half().float() - base.float()
    elif kind == "ints":  # masses of equal magnitudes, zeros and both signs
        x = torch.randint(-3, 4, (n,), generator=g).float() / 4
    elif kind == "sparse":
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.05)
    else:
        raise AssertionError(kind)
    x[::7] = -0.0  # negative zeros: |−0.0| = 0 must rank with the zeros
    return x


SIZES = [1, 2, 7, 1000, 65_537, 300_007]
KINDS = ["randn", "fp16", "ints", "sparse"]


# -- TIES / breadcrumbs selection ------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_select_top_is_the_stable_sort_definition(n, kind):
    row = awkward(n, kind)
    for m in sorted({0, 1, 2, n // 10, n // 3, n // 2, n - 1, n, int(0.2 * n + 0.5)}):
        want = ref_select_top(row, m)
        got = sparsify.select_top(row, m)
        whole = slice(0, n)
        assert torch.equal(got.mask(row, whole), want.mask(row, whole)), (m, got, want)
        assert int(got.mask(row, whole).sum()) == max(0, min(m, n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_trims_are_bit_identical(n, kind):
    row = awkward(n, kind, seed=1)
    for k in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert torch.equal(sparsify.trim_top_(row.clone(), k).view(torch.int32),
                           ref_trim_top_(row.clone(), k).view(torch.int32)), k
        for gamma in (0.0, 0.01, 0.3):
            assert torch.equal(sparsify.trim_band_(row.clone(), k, gamma).view(torch.int32),
                               ref_trim_band_(row.clone(), k, gamma).view(torch.int32)), (k, gamma)


def test_selection_with_infinities_and_subnormals():
    row = awkward(70_001, "randn", seed=2)
    row[5] = float("inf")
    row[6] = -float("inf")
    row[100:200] = 1e-40  # subnormal magnitudes
    for m in (1, 2, 3, 150, 35_000):
        whole = slice(0, row.numel())
        assert torch.equal(sparsify.select_top(row, m).mask(row, whole), ref_select_top(row, m).mask(row, whole)), m


def _apply_in_parts(selection, row, parts):
    out = row.clone()
    for part in parts:
        selection.apply_(out, part)
    return out


@pytest.mark.parametrize("kind", KINDS + ["extremes"])
def test_in_place_trim_keeps_what_the_mask_keeps(kind):
    """TopSelection.apply_ (hardshrink at the threshold's float) against the bool mask, on parts
    that split the row anywhere — also inside the run of elements equal to the threshold, where
    those before the cut go and those after stay. A trimmed entry is 0 (an infinite one too, where
    a multiply by the mask gives NaN); zeros compare by value (+0 and −0 alike)."""
    n = 70_001
    row = awkward(n, "ints" if kind == "extremes" else kind, seed=8)
    if kind == "extremes":
        row[5], row[6], row[7] = float("inf"), -float("inf"), -0.0
        row[100:200] = 1e-40
        row[300:310] = -1e-45  # the smallest subnormal
    cuts = [0, 1, 999, 35_000, 35_001, 69_999, n]
    parts = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    for m in (0, 1, 3, 150, n // 5, n // 2, n - 1, n):
        selection = sparsify.select_top(row, m)
        want = torch.where(selection.mask(row, slice(0, n)), row, 0.0)
        got = _apply_in_parts(selection, row, parts)
        assert torch.equal((got + 0.0).view(torch.int32), (want + 0.0).view(torch.int32)), (m, selection)
        assert int((got != 0).sum()) == int((want != 0).sum())
    # a threshold at +inf and one with a cut inside a part: chosen directly
    for selection in (sparsify.TopSelection(0x7F800000, 0), sparsify.TopSelection(0x7F800000, 6),
                      sparsify.TopSelection(int(row[50:51].abs().view(torch.int32)), 40_000)):
        want = torch.where(selection.mask(row, slice(0, n)), row, 0.0)
        got = _apply_in_parts(selection, row, [slice(0, 60_000), slice(60_000, n)])
        assert torch.equal((got + 0.0).view(torch.int32), (want + 0.0).view(torch.int32)), selection


# -- DELLA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_della_keep_probabilities_are_bit_identical(n, kind):
    row = awkward(n, kind, seed=3)
    for p, eps in ((0.5, 0.2), (0.1, -0.1), (0.9, 2.0), (0.0, -2.0)):
        got = sparsify.della_keep_probabilities(row.clone(), p, eps)
        want = ref_della_keep_probabilities(row.clone(), p, eps)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (p, eps)


def test_below_is_the_comparison():
    g = torch.Generator().manual_seed(9)
    u = torch.rand(100_000, generator=g)
    u[:10] = torch.tensor([0.0, 1e-45, 1e-40, 0.1, 0.5, 0.5, 1 - 2**-24, 0.25, 0.75, 0.3])
    q = torch.rand(100_000, generator=g)
    q[:10] = torch.tensor([0.0, 1e-45, 2e-40, 0.1, 0.5, 0.5000001, 1.0, 0.25, 0.7499999, 0.3])
    assert torch.equal(sparsify.below(u.clone(), q), (u < q).float())
    for scalar in (0.0, 0.1, 0.5, 0.9, 1.0, 1e-45):  # 0.1 and 0.9 are not floats: both sides round them alike
        assert torch.equal(sparsify.below(u.clone(), scalar), (u < scalar).float()), scalar


@pytest.mark.parametrize("kind", KINDS)
def test_della_drop_is_bit_identical(kind):
    row = awkward(140_001, kind, seed=4)
    # (0.95, 0.5): q is clamped to 0 for the smaller half of the ranks, and 0 must not divide
    for (p, eps), rescale in itertools.product(((0.4, 0.3), (0.95, 0.5)), (False, True)):
        got = sparsify.della_drop_(row.clone(), ctx=CTX, model_index=2, p=p, eps=eps, rescale=rescale)
        want = ref_della_drop_(row.clone(), ctx=CTX, model_index=2, p=p, eps=eps, rescale=rescale)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (p, eps, rescale)


# -- train_difference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_train_difference_is_bit_identical(kind):
    a = awkward(100_003, kind, seed=5)
    b = a + awkward(100_003, kind, seed=6)
    c = b - awkward(100_003, kind, seed=7)
    c[::5] = b[::5]  # B = C: 0/0 where also A = B
    a[::10] = b[::10]
    spec = get_method("train_difference")
    for alpha in (0.0, 0.35, 1.0, -0.5):
        got = spec.fn(a.clone(), b.clone(), c.clone(), ctx=CTX, alpha=alpha)
        assert torch.equal(got.view(torch.int32), ref_train_difference(a, b, c, alpha).view(torch.int32)), alpha


# -- slerp / bislerp --------------------------------------------------------------------------------------
def slerp_pair(n: int, kind: str, seed: int):
    a = awkward(n, kind, seed)
    b = awkward(n, kind, seed + 1)
    return a, b


def assert_slerp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical except where the scalars (norms, weights), which now come from fp64 sums in
    a different order, round differently in their last fp32 bit: then at most 2 ulp apart."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    same = got.view(torch.int32) == want.view(torch.int32)
    if bool(same.all()):
        return
    diff = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert int(diff.max()) <= 2, int(diff.max())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_slerp_matches_the_whole_tensor_fp64_version(n, kind):
    a, b = slerp_pair(n, kind, seed=8)
    for t in (0.0, 0.3, 0.5, 1.0, 1.4):
        assert_slerp_close(slerp_tensors(a, b, t), ref_slerp_tensors(a, b, t))


def test_slerp_bits_on_fp16_inputs_match_and_fall_backs_are_exact():
    a, b = slerp_pair(300_007, "randn", seed=9)
    a16, b16 = a.half(), b.half()
    exact = 0
    for t in (0.1, 0.25, 0.7):
        got = slerp_tensors(a16, b16, t)  # storage-dtype inputs are read chunk by chunk
        want = ref_slerp_tensors(a16.float(), b16.float(), t)
        assert_slerp_close(got, want)
        exact += torch.equal(got, want)
    assert exact >= 2  # differing scalars are the rare exception, not the rule
    # (anti)parallel and zero tensors take the lerp path, which is elementwise and exact
    for other in (a * 3, -a, torch.zeros_like(a), a * 3 + 1e-9):
        for t in (0.2, 0.9):
            assert torch.equal(slerp_tensors(a, other, t), ref_slerp_tensors(a, other, t))


def test_slerp_method_takes_handles_and_fp32_tensors_alike():
    a, b = slerp_pair(5_003, "fp16", seed=10)

    class Handle:
        def __init__(self, t):
            self.t, self.loads = t, 0

        def load(self):
            self.loads += 1
            return self.t

    spec = get_method("slerp")
    ha, hb = Handle(a.half()), Handle(b.half())
    via_handles = spec.fn(ha, hb, ctx=CTX, alpha=0.4)
    assert torch.equal(via_handles, spec.fn(a.half().float(), b.half().float(), ctx=CTX, alpha=0.4))
    assert ha.loads == hb.loads == 1  # a noise input is generated once, not once per pass


@pytest.mark.parametrize("kind", KINDS)
def test_bislerp_matches_the_nested_whole_tensor_version(kind):
    n = 70_001
    a, b = slerp_pair(n, kind, seed=11)
    c, d = slerp_pair(n, kind, seed=13)
    spec = get_method("bislerp")
    for alpha, beta in ((0.3, 0.6), (0.0, 1.0), (1.0, 0.5)):
        got = spec.fn(a, b, c, d, ctx=CTX, alpha=alpha, beta=beta)
        want = ref_slerp_tensors(ref_slerp_tensors(a, b, alpha), ref_slerp_tensors(c, d, alpha), beta)
        assert_slerp_close(got, want)



# -- the task-vector pipeline: election, combination and A + α·τ fused into one pass --------------------
def _elect_(block, weights, vote):
    signs = torch.sign(block)
    if vote == "count":
        tally = signs.sum(dim=0)
    else:
        tally = torch.matmul(weights.to(torch.float32), block)
    block.mul_(signs == torch.sign(tally))


def _combine(block, weights, config):
    w = weights.to(torch.float32)
    total = torch.matmul(w, block)
    if config.combine != "mean":
        return total
    present = torch.matmul(w, (block != 0).to(torch.float32))
    return torch.where(present > 0, total / present.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(total))


def ref_merge(base, models, ctx, config, alpha, weights):
    """The pipeline before the fused pass (sum/mean combinations), with the reference trims,
    election and combination."""
    from lib_merge.methods.median import row_chunk

    n = base.numel()
    deltas = torch.stack([m.reshape(-1).float() - base.reshape(-1).float() for m in models])
    for i in range(len(models)):
        row = deltas[i]
        if config.drop == "della":
            ref_della_drop_(row, ctx=ctx, model_index=i + 1, p=config.p, eps=config.della_eps, rescale=config.rescale)
        if config.trim == "top":
            ref_trim_top_(row, config.k)
        elif config.trim == "band":
            ref_trim_band_(row, config.k, config.gamma)
    across = row_chunk(len(models))
    if config.vote != "none":
        for part in sparsify.chunks(n, across):
            _elect_(deltas[:, part], weights, config.vote)
    tau = torch.empty(n, dtype=torch.float32)
    for part in sparsify.chunks(n, across):
        tau[part] = _combine(deltas[:, part], weights, config)
    flat_a = base.reshape(-1)
    for part in sparsify.chunks(n):
        tau[part].mul_(alpha).add_(flat_a[part])
    return tau.view(base.shape)


@pytest.mark.parametrize("name,params", [
    ("ties", {"k": 0.2}), ("ties", {"k": 0.5, "vote": "count", "task_weights": "1,0.5,2"}),
    ("breadcrumbs", {}), ("breadcrumbs", {"vote": "sum"}),
    ("della", {}), ("della", {"vote": "count", "eps": -0.3, "rescale": False}),
])
def test_task_vector_methods_are_bit_identical(name, params):
    from lib_merge.methods.task_vector import TaskVectorConfig

    n = 200_003
    base = awkward(n, "randn", seed=20).half()
    models = [(base.float() + awkward(n, kind, seed=21 + i) * 0.01).half() for i, kind in enumerate(("fp16", "ints", "randn"))]
    spec = get_method(name)
    resolved = spec.resolve_params(params)
    got = spec.fn(base, *models, ctx=CTX, **resolved)
    vote = resolved["vote"]
    combine = "mean" if vote != "none" else "sum"
    config = {
        "ties": TaskVectorConfig(trim="top", k=resolved.get("k", 1.0), vote=vote, combine="mean"),
        "breadcrumbs": TaskVectorConfig(trim="band", k=resolved.get("k", 1.0), gamma=resolved.get("gamma", 0.0),
                                        vote=vote, combine=combine),
        "della": TaskVectorConfig(drop="della", p=resolved.get("p", 0.0), della_eps=resolved.get("eps", 0.0),
                                  rescale=resolved.get("rescale", False), vote=vote, combine=combine),
    }[name]
    text = resolved.get("task_weights", "")
    weights = torch.tensor([float(v) for v in text.split(",")], dtype=torch.float64) if text else torch.ones(3, dtype=torch.float64)
    want = ref_merge(base, models, CTX, config, resolved["alpha"], weights)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
