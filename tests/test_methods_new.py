"""karcher, multislerp, add_perpendicular, sce: identities and independent re-derivations."""
from __future__ import annotations

import math

import pytest
import torch

from lib_merge.methods.registry import KeyContext, get_method

CTX = KeyContext("k")


def run(name, *tensors, **params):
    spec = get_method(name)
    return spec.fn(*tensors, ctx=CTX, **spec.resolve_params(params))


def slerp_ref(a, b, t):
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    theta = torch.arccos((ua * ub).sum().clamp(-1, 1))
    d = (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / torch.sin(theta)
    return d * ((1 - t) * na + t * nb)


@pytest.mark.parametrize("name", ["karcher", "multislerp"])
def test_identical_models_give_that_model(name):
    a = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(run(name, a, a.clone(), a.clone()), a)


def test_karcher_of_two_is_slerp():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    got = run("karcher", a, b, model_weights="0.7,0.3", tol=1e-12, max_iter=200)
    torch.testing.assert_close(got, slerp_ref(a, b, 0.3), rtol=1e-7, atol=1e-9)
    # equal weights: the midpoint slerp
    torch.testing.assert_close(run("karcher", a, b, tol=1e-12, max_iter=200), slerp_ref(a, b, 0.5), rtol=1e-7, atol=1e-9)


def test_multislerp_two_models_at_midpoint_is_slerp():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    # with equal weights the tangent vanishes: the result is the normalised mean direction, scaled
    torch.testing.assert_close(run("multislerp", a, b), slerp_ref(a, b, 0.5), rtol=1e-6, atol=1e-8)
    base = torch.randn(30, generator=g, dtype=torch.float64)
    torch.testing.assert_close(run("multislerp", base, base + a, base + b, use_base=True), base + slerp_ref(a, b, 0.5),
                               rtol=1e-6, atol=1e-8)


def test_add_perpendicular():
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3))
    out = run("add_perpendicular", a, b, c, alpha=0.8)
    added = (out - a) / 0.8
    assert abs(float((added * (a - c)).sum())) < 1e-9  # orthogonal to A's own change
    torch.testing.assert_close(added + (a - c) * float(((b - c) * (a - c)).sum() / ((a - c) ** 2).sum()), b - c)
    torch.testing.assert_close(run("add_perpendicular", c, b, c, alpha=1.0), b)  # Δa = 0: all of Δb


def test_sce_against_elementwise_definition():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, generator=g, dtype=torch.float64)
    models = [base + torch.randn(40, generator=g, dtype=torch.float64) * s for s in (0.1, 0.2, 0.3)]
    out = run("sce", base, *models, select_topk=0.5)
    tau = torch.stack([m - base for m in models])
    var = tau.var(dim=0, unbiased=False)
    keep = set(var.argsort(descending=True)[:20].tolist())
    tau = torch.stack([torch.tensor([t[j] if j in keep else 0.0 for j in range(40)], dtype=torch.float64) for t in tau])
    e = [float((t ** 2).mean()) for t in tau]
    w = [x / sum(e) for x in e]
    want = base.clone()
    for j in range(40):
        s = 1.0 if float(tau[:, j].sum()) >= 0 else -1.0
        num = sum(w[i] * float(tau[i, j]) for i in range(3) if math.copysign(1, float(tau[i, j])) == s and tau[i, j] != 0)
        den = sum(w[i] for i in range(3) if math.copysign(1, float(tau[i, j])) == s and tau[i, j] != 0)
        want[j] += num / max(den, 1e-6)
    torch.testing.assert_close(out, want)
