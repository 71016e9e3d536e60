"""add_perpendicular, multislerp and sce read their inputs through handles and stream their
working set; their results must stay bit for bit those of the whole-tensor formulas they
replaced (kept below verbatim, as they were in perpendicular.py, nway.py and sce.py), on the
engine's single intra-op thread, for fp32 tensors and for fp16 inputs read through handles."""
from __future__ import annotations

import math
import weakref

import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.methods import get_method
from lib_merge.methods.basic import parse_model_weights


# -- the formulas as they were (verbatim bodies) ---------------------------------------------------
def old_add_perpendicular(a, b, c, *, alpha):
    da, db = a - c, b - c
    norm2 = float(torch.dot(da.reshape(-1).double(), da.reshape(-1).double()))
    if norm2 == 0:
        return a + alpha * db
    dot = float(torch.dot(da.reshape(-1).double(), db.reshape(-1).double()))
    perp = torch.nan_to_num(db - (dot / norm2) * da)
    return a + alpha * perp


def old_multislerp(*models, model_weights, normalize_weights, use_base):
    eps = 1e-8
    base = models[0] if use_base else None
    points = models[1:] if use_base else models
    if not points:
        raise BadParameterError("multislerp with use_base needs models B, C, … besides the base A")
    if normalize_weights or not model_weights.strip():
        w = parse_model_weights(model_weights, len(points))
    else:
        w = [float(v) for v in model_weights.split(",")]
        if len(w) != len(points):
            raise BadParameterError(f"multislerp: model_weights has {len(w)} values for {len(points)} models")
    xs = [(p - base if base is not None else p).reshape(-1) for p in points]
    norms = [float(x.norm()) for x in xs]
    us = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(wi * ui for wi, ui in zip(w, us))
    if float(m.norm()) < eps:
        if len(xs) == 2:
            out = w[0] * xs[0] + w[1] * xs[1]
            return (out.reshape(points[0].shape) + (base if base is not None else 0))
        raise BadParameterError("multislerp: the directions cancel out (their weighted mean is 0)")
    m_hat = m / m.norm()
    tangent = sum(wi * (ui - torch.dot(ui, m_hat) * m_hat) for wi, ui in zip(w, us))
    size = float(tangent.norm())
    direction = m_hat if size < eps else math.cos(size) * m_hat + math.sin(size) * tangent / size
    out = (sum(wi * n for wi, n in zip(w, norms)) * direction).reshape(points[0].shape)
    return out + base if base is not None else out


def old_sce(*models, select_topk):
    base = models[0]
    tau = torch.stack([m - base for m in models[1:]]).reshape(len(models) - 1, -1)
    if select_topk < 1:
        var = tau.var(dim=0, unbiased=False)
        keep = int(int((var != 0).sum()) * select_topk)
        mask = torch.zeros_like(var, dtype=torch.bool)
        if keep:
            mask[var.topk(keep).indices] = True
        tau = tau * mask
    energy = tau.square().mean(dim=1)
    total = float(energy.sum())
    w = energy / total if total > 0 else torch.full_like(energy, 1.0 / len(energy))
    sign = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tau) == sign).float()
    num = (w[:, None] * agree * tau).sum(dim=0)
    den = (w[:, None] * agree).sum(dim=0).clamp_min(1e-6)
    return base + (num / den).reshape(base.shape)


# -- harness ----------------------------------------------------------------------------------------
class Handle:
    """An engine-style handle: the input in its storage dtype, mapped by load()."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype
        self.loads = 0

    def load(self) -> torch.Tensor:
        self.loads += 1
        return self.tensor


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the engine's workers
    yield
    torch.set_num_threads(before)


SHAPE = (301, 1003)  # 301 903 elements: several chunks and a ragged last one


def models(count: int, seed: int, spread: float = 0.05) -> list[torch.Tensor]:
    """fp16 models near a common base, with exact ±0.0 entries (zeros' signs are pinned too)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    out = []
    for i in range(count):
        t = (base + spread * torch.randn(SHAPE, generator=g)).half()
        t.view(-1)[i::97] = 0.0
        t.view(-1)[i + 1::89] = -0.0
        t.view(-1)[::101] = -0.0  # in every model at once
        out.append(t)
    return out


def same(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Bit for bit, NaN and the sign of zero included."""
    return new.shape == old.shape and new.dtype == old.dtype and torch.equal(new.view(torch.int32), old.view(torch.int32))


def check(name: str, old, tensors: list[torch.Tensor], **params) -> None:
    spec = get_method(name)
    full = spec.resolve_params({k: str(v) for k, v in params.items()})
    expected = old(*[t.float() for t in tensors], **{k: full[k] for k in params})
    plain = spec.fn(*[t.float() for t in tensors], ctx=None, **full)
    handles = [Handle(t) for t in tensors]
    streamed = spec.fn(*handles, ctx=None, **full)
    assert same(plain, expected), name
    assert same(streamed, expected), name


# -- add_perpendicular --------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.35, -2.0])
def test_add_perpendicular_is_the_whole_tensor_formula(alpha):
    check("add_perpendicular", old_add_perpendicular, models(3, 1), alpha=alpha)


def test_add_perpendicular_edge_cases():
    a, b, c = models(3, 2)
    check("add_perpendicular", old_add_perpendicular, [a, b, a.clone()], alpha=0.7)  # Δa = 0: Δb whole
    big = a.clone()
    big.view(-1)[5] = float("inf")  # ‖Δa‖² = inf: the ratio is 0 or NaN, nan_to_num takes over
    check("add_perpendicular", old_add_perpendicular, [big, b, c], alpha=0.7)
    nan = b.clone()
    nan.view(-1)[7] = float("nan")
    check("add_perpendicular", old_add_perpendicular, [a, nan, c], alpha=0.7)
    check("add_perpendicular", old_add_perpendicular, [nan, b, c], alpha=0.7)


def test_add_perpendicular_maps_at_most_two_inputs_at_once():
    # each load() returns a fresh tensor (as the engine's mmap windows are); count the live ones
    live, most = set(), [0]

    class Tracked(Handle):
        def load(self):
            t = self.tensor.clone()
            live.add(id(t))
            most[0] = max(most[0], len(live))
            weakref.finalize(t, live.discard, id(t))
            return t

    a, b, c = models(3, 3)
    get_method("add_perpendicular").fn(Tracked(a), Tracked(b), Tracked(c), ctx=None, alpha=1.0)
    assert most[0] <= 2


# -- multislerp -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("weights,normalize", [("", True), ("0.2,0.5,0.3", True), ("0.9,-0.4,0.7", False)])
def test_multislerp_is_the_whole_tensor_formula(use_base, weights, normalize):
    tensors = models(4 if use_base else 3, 4, spread=0.5)
    check("multislerp", old_multislerp, tensors, model_weights=weights, normalize_weights=normalize, use_base=use_base)


def test_multislerp_edge_cases():
    a, b, c = models(3, 5)
    kw = {"model_weights": "", "normalize_weights": True}
    check("multislerp", old_multislerp, [a, a.clone(), a.clone()], use_base=False, **kw)  # tangent 0: m̂ itself
    zero = torch.zeros(SHAPE, dtype=torch.float16)
    check("multislerp", old_multislerp, [zero, b, c], use_base=False, **kw)  # a zero-norm point
    # opposite directions: the mean is 0 and two points fall back to w₀x₀ + w₁x₁ (+ 0 / + A)
    opposite = -b
    opposite.view(-1)[::101] = -0.0  # −0 in both: w₀x₀ + w₁x₁ is −0 there, and the formula's "+ 0" makes it +0
    check("multislerp", old_multislerp, [b, opposite], use_base=False, **kw)
    g = torch.Generator().manual_seed(8)
    base, step = (torch.randint(-50, 50, SHAPE, generator=g).half() for _ in range(2))  # ± exact in fp16
    check("multislerp", old_multislerp, [base, base + step, base - step], use_base=True, **kw)
    nan = b.clone()
    nan.view(-1)[11] = float("nan")
    check("multislerp", old_multislerp, [a, nan, c], use_base=False, **kw)
    with pytest.raises(BadParameterError, match="cancel out"):
        get_method("multislerp").fn(b, -b, zero, ctx=None, model_weights="0.5,0.5,0", normalize_weights=True,
                                    use_base=False)


# -- sce ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.01, 0.0])  # 0.01: topk's partial_sort path
def test_sce_is_the_whole_tensor_formula(topk):
    # fp16 task vectors are coarse: many variances tie at the top-k threshold, so which tied
    # entries topk keeps is pinned too
    check("sce", old_sce, models(4, 6), select_topk=topk)


def test_sce_edge_cases():
    a, b, c = models(3, 7)
    check("sce", old_sce, [a, a.clone(), a.clone()], select_topk=1.0)  # no task vector: Σ energy = 0
    check("sce", old_sce, [a, a.clone(), a.clone()], select_topk=0.5)  # and no variance either
    check("sce", old_sce, [a, b, a.clone()], select_topk=0.3)  # one zero task vector
    nan = b.clone()
    nan.view(-1)[13] = float("nan")
    check("sce", old_sce, [a, nan, c], select_topk=0.5)  # topk ranks NaN first
