"""A LoKr conv whose second factor is 2-D ([b, d·kh·kw]: ``w2_a @ w2_b`` with a 2-D ``w2_b``, or a
bare 2-D ``lokr_w2``) against the real loaders' formula, written out here element by element:
A1111's built-in Lora (network_lokr.py ``make_kron``: kron of the 2-D factors, then reshape to the
weight's shape), Forge (backend/patcher/lora.py: ``torch.kron(w1, w2).reshape(weight.shape)``) and
LyCORIS (modules/lokr.py: the same 2-D kron, then ``view(shape)``) all give
    ΔW.flat2d[i₁·b + i₂, j₁·(d·kh·kw) + j₂] = w1[i₁, j₁] · w2[i₂, j₂],
read as [a·b, c·d, kh, kw] — so each row of w2 is [d, kh, kw], the kernel trailing."""
from __future__ import annotations

import pytest
import torch

from lib_merge.lora.delta import delta_shape, scale, weight_delta


def loaders_formula(w1: torch.Tensor, w2: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    a, c = w1.shape
    b, cols = w2.shape
    flat = torch.zeros(a * b, c * cols, dtype=torch.float64)
    for i1 in range(a):
        for j1 in range(c):
            for i2 in range(b):
                for j2 in range(cols):
                    flat[i1 * b + i2, j1 * cols + j2] = float(w1[i1, j1]) * float(w2[i2, j2])
    return flat.reshape(weight_shape)


A, C, B, D, KH, KW, R = 2, 3, 4, 5, 3, 2, 2  # a non-square kernel: a kh/kw swap shows
SHAPE = (A * B, C * D, KH, KW)


@pytest.fixture
def factors():
    g = torch.Generator().manual_seed(4)
    return {name: torch.randn(*shape, generator=g) for name, shape in {
        "w1": (A, C), "w1_a": (A, R), "w1_b": (R, C), "w2": (B, D * KH * KW), "w2_a": (B, R), "w2_b": (R, D * KH * KW),
    }.items()}


def check(parts: dict, w1: torch.Tensor, w2: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in parts.items() if k != "alpha"}
    assert delta_shape("lokr", shapes) == (SHAPE[0], SHAPE[1] * KH * KW)
    got = weight_delta("lokr", parts, SHAPE)
    want = loaders_formula(w1, w2, SHAPE)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_factored_second_factor(factors):
    f = factors
    check({"lokr_w1": f["w1"], "lokr_w2_a": f["w2_a"], "lokr_w2_b": f["w2_b"]}, f["w1"], f["w2_a"] @ f["w2_b"])


def test_bare_2d_second_factor_and_factored_first(factors):
    f = factors
    check({"lokr_w1_a": f["w1_a"], "lokr_w1_b": f["w1_b"], "lokr_w2": f["w2"]}, f["w1_a"] @ f["w1_b"], f["w2"])


def test_lycoris_functional_layout_is_the_same_layer(factors):
    """LyCORIS's functional API keeps w2_b as [r, d, kh, kw] and unsqueezes w1 to [a, c, 1, 1]
    before a 4-D kron; the layer is the same as the 2-D form of the same numbers."""
    f = factors
    parts = {"lokr_w1": f["w1"], "lokr_w2_a": f["w2_a"], "lokr_w2_b": f["w2_b"].reshape(R, D, KH, KW),
             "alpha": torch.tensor(1.0)}
    check(parts, f["w1"], f["w2_a"] @ f["w2_b"])
    assert scale("lokr", parts) == pytest.approx(1.0 / R)  # s = α/r, r = w2_a's rank (LyCORIS: gamma / rank)
