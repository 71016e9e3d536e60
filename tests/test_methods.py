"""Merge methods on small hand-computed tensors, the native fp16/bf16 kernel, and the registry."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lib_merge.errors import BadParameterError, UnknownMethodError
from lib_merge.methods import KeyContext, MethodSpec, Param, all_methods, get_method, key_seed
from lib_merge.methods.basic import parse_model_weights

CTX = KeyContext("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "IN01", 0)


def run(name: str, *tensors: torch.Tensor, **params) -> torch.Tensor:
    spec = get_method(name)
    resolved = spec.resolve_params(params)
    return spec.fn(*[t.clone() for t in tensors], ctx=CTX, **resolved)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def abcd() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(3, 5, 7, generator=g) for _ in range(4)]


# ---- linear methods ------------------------------------------------------------------------------


def test_weighted_sum_endpoints_are_the_models(abcd):
    a, b = abcd[:2]
    assert torch.equal(run("weighted_sum", a, b, alpha=0.0), a)
    assert torch.equal(run("weighted_sum", a, b, alpha=1.0), b)


def test_weighted_sum_alpha_is_b_share():
    out = run("weighted_sum", t(0.0, 2.0, -4.0), t(4.0, 2.0, 4.0), alpha=0.25)
    assert torch.equal(out, t(1.0, 2.0, -2.0))


def test_add_difference_hand_values(abcd):
    a, b, c = t(1.0, 2.0, 3.0), t(3.0, 5.0, -1.0), t(5.0, 1.0, -1.0)
    # A + α(B − C) with α = 0.5: B − C = (-2, 4, 0)
    assert torch.equal(run("add_difference", a, b, c, alpha=0.5), t(0.0, 4.0, 3.0))
    x, y, z = abcd[:3]
    assert torch.equal(run("add_difference", x, y, z, alpha=0.0), x)


def test_triple_sum_hand_values():
    a, b, c = t(1.0, 0.0), t(3.0, 4.0), t(5.0, 8.0)
    # (1 − α − β)A + αB + βC with α = 0.25, β = 0.5
    assert torch.equal(run("triple_sum", a, b, c, alpha=0.25, beta=0.5), t(3.5, 5.0))
    assert torch.equal(run("triple_sum", a, b, c, alpha=0.0, beta=0.0), a)


def test_sum_twice_hand_values():
    a, b, c = t(1.0, 0.0), t(3.0, 4.0), t(5.0, 8.0)
    # (1 − β)[(1 − α)A + αB] + βC with α = 0.25, β = 0.5: inner (1.5, 1), result (3.25, 4.5)
    assert torch.equal(run("sum_twice", a, b, c, alpha=0.25, beta=0.5), t(3.25, 4.5))
    assert torch.equal(run("sum_twice", a, b, c, alpha=1.0, beta=0.0), b)
    assert torch.equal(run("sum_twice", a, b, c, alpha=0.0, beta=1.0), c)


# ---- train_difference ----------------------------------------------------------------------------


def test_train_difference_hand_values():
    # A + 1.8·α·(B − C)·|B − A| / (|B − A| + |B − C|)
    a, b, c = t(1.0, 0.0), t(3.0, 2.0), t(2.0, 4.0)
    # elem 0: B−C = 1, |B−A| = 2, scale 2/3 → 1 + 1.8·1·(2/3) = 2.2
    # elem 1: B−C = −2, |B−A| = 2, scale 2/4 → 0 + 1.8·(−2)·0.5 = −1.8
    out = run("train_difference", a, b, c, alpha=1.0)
    torch.testing.assert_close(out, t(2.2, -1.8), rtol=0, atol=1e-6)
    half = run("train_difference", a, b, c, alpha=0.5)
    torch.testing.assert_close(half, t(1.6, -0.9), rtol=0, atol=1e-6)


def test_train_difference_b_equals_c_gives_a(abcd):
    a, b = abcd[:2]
    assert torch.equal(run("train_difference", a, b, b.clone(), alpha=1.0), a)


def test_train_difference_zero_over_zero_is_zero():
    # all three equal: |B − A| = |B − C| = 0 → 0/0, which must count as 0 (result A), not NaN
    a = t(1.5, -2.0, 0.0)
    out = run("train_difference", a, a.clone(), a.clone(), alpha=1.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, a)
    # A == B but C differs: |B − A| = 0 → nothing is added
    out = run("train_difference", a, a.clone(), t(0.0, 0.0, 1.0), alpha=1.0)
    assert torch.equal(out, a)


def test_train_difference_alpha_zero_gives_a(abcd):
    a, b, c = abcd[:3]
    assert torch.equal(run("train_difference", a, b, c, alpha=0.0), a)


# ---- slerp / bislerp -----------------------------------------------------------------------------


def test_slerp_endpoints(abcd):
    a, b = abcd[:2]
    torch.testing.assert_close(run("slerp", a, b, alpha=0.0), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run("slerp", a, b, alpha=1.0), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_of_parallel_tensors_is_lerp(abcd, alpha):
    a = abcd[0]
    for b in (a * 3.0, a * -2.0):  # parallel and antiparallel
        expected = torch.lerp(a, b, alpha)
        torch.testing.assert_close(run("slerp", a, b, alpha=alpha), expected, rtol=1e-6, atol=1e-6)


def test_slerp_orthogonal_unit_vectors_at_half():
    out = run("slerp", t(1.0, 0.0), t(0.0, 1.0), alpha=0.5)
    s = math.sqrt(0.5)
    torch.testing.assert_close(out, t(s, s), rtol=0, atol=1e-6)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-6)  # lerp would give norm 0.707


def test_slerp_norm_is_interpolated_and_angle_is_proportional():
    a, b = t(2.0, 0.0), t(0.0, 4.0)
    out = run("slerp", a, b, alpha=0.5)
    # direction at 45°, norm (2 + 4) / 2 = 3
    torch.testing.assert_close(out, t(3 / math.sqrt(2), 3 / math.sqrt(2)), rtol=0, atol=1e-5)
    out = run("slerp", t(1.0, 0.0), t(0.0, 1.0), alpha=1 / 3)
    angle = math.atan2(out[1].item(), out[0].item())
    assert angle == pytest.approx(math.pi / 6, abs=1e-6)


def test_slerp_with_zero_tensor_falls_back_to_lerp():
    a = t(1.0, 2.0)
    out = run("slerp", a, torch.zeros(2), alpha=0.25)
    torch.testing.assert_close(out, t(0.75, 1.5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha,beta,corner", [(0.0, 0.0, 0), (1.0, 0.0, 1), (0.0, 1.0, 2), (1.0, 1.0, 3)])
def test_bislerp_corners_are_the_four_models(abcd, alpha, beta, corner):
    out = run("bislerp", *abcd, alpha=alpha, beta=beta)
    torch.testing.assert_close(out, abcd[corner], rtol=1e-5, atol=1e-5)


def test_bislerp_is_slerp_of_slerps(abcd):
    a, b, c, d = abcd
    inner_ab = run("slerp", a, b, alpha=0.3)
    inner_cd = run("slerp", c, d, alpha=0.3)
    expected = run("slerp", inner_ab, inner_cd, alpha=0.6)
    torch.testing.assert_close(run("bislerp", a, b, c, d, alpha=0.3, beta=0.6), expected, rtol=1e-6, atol=1e-6)


# ---- soup ----------------------------------------------------------------------------------------


def test_soup_of_identical_models_is_that_model(abcd):
    a = abcd[0]
    torch.testing.assert_close(run("soup", a, a.clone(), a.clone()), a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(run("soup", a, a.clone(), model_weights="1,2"), a, rtol=1e-6, atol=1e-7)


def test_soup_is_the_weighted_mean():
    a, b, c = t(0.0, 3.0), t(3.0, 6.0), t(6.0, -3.0)
    torch.testing.assert_close(run("soup", a, b, c), t(3.0, 2.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(run("soup", a, b, c, model_weights="1,1,2"), t(3.75, 0.75), rtol=0, atol=1e-6)


def test_soup_is_order_invariant(abcd):
    ref = run("soup", *abcd)
    for perm in itertools.permutations(range(4)):
        torch.testing.assert_close(run("soup", *[abcd[i] for i in perm]), ref, rtol=1e-6, atol=1e-6)
    weights = [1.0, 2.0, 3.0, 4.0]
    ref_w = run("soup", *abcd, model_weights=",".join(map(str, weights)))
    for perm in [(3, 2, 1, 0), (1, 3, 0, 2)]:
        permuted = run("soup", *[abcd[i] for i in perm], model_weights=",".join(str(weights[i]) for i in perm))
        torch.testing.assert_close(permuted, ref_w, rtol=1e-6, atol=1e-6)


def test_soup_does_not_modify_its_inputs(abcd):
    copies = [x.clone() for x in abcd]
    get_method("soup").fn(*abcd, ctx=CTX, model_weights="")
    for x, y in zip(abcd, copies):
        assert torch.equal(x, y)


def test_model_weights_parsing():
    assert parse_model_weights("", 4) == [0.25] * 4
    assert parse_model_weights("  ", 2) == [0.5, 0.5]
    assert parse_model_weights("1,1,2", 3) == [0.25, 0.25, 0.5]
    assert parse_model_weights(" 3 , 1 ", 2) == [0.75, 0.25]


@pytest.mark.parametrize(
    "text,n,fragment",
    [
        ("1,x", 2, "comma-separated numbers"),
        ("1,2", 3, "2 values for 3 models"),
        ("1,2,3,4", 3, "4 values for 3 models"),
        ("1,-1", 2, "sum to 0"),
    ],
)
def test_model_weights_errors(text, n, fragment):
    with pytest.raises(BadParameterError, match="soup") as err:
        parse_model_weights(text, n)
    assert fragment in str(err.value)


# ---- the native kernel (engine fast path) --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_lerp_is_bit_identical_to_fp32_path(dtype):
    """The engine writes ``spec.native`` output instead of the fp32 path + cast whenever inputs and
    output share a dtype: the two must agree bit for bit, or outputs depend on the path taken."""
    spec = get_method("weighted_sum")
    assert spec.native is not None
    g = torch.Generator().manual_seed(7)
    parts = []
    for scale in (1e-6, 1e-3, 0.02, 1.0, 300.0, 1e4):  # subnormal … near fp16 max
        parts.append((torch.randn(40_003, generator=g) * scale).clamp(-6e4, 6e4))
    a = torch.cat(parts).to(dtype)
    b = torch.cat([p[torch.randperm(p.numel(), generator=g)] for p in parts]).to(dtype)
    b[:5000] = a[:5000]  # equal pairs
    b[5000:10000] = -a[5000:10000]  # opposite signs
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    for alpha in (0.1, 0.3, 0.5, 0.7, 0.9):
        expected = spec.fn(a.float(), b.float(), ctx=CTX, alpha=alpha).to(dtype)
        for lo, hi in ((0, a.numel()), (3, 1001), (17, 200_017)):  # odd slices, as the engine chunks
            out = torch.empty(hi - lo, dtype=dtype)
            spec.native(out, a[lo:hi], b[lo:hi], alpha=alpha)
            mismatch = (out.view(torch.int16) != expected[lo:hi].view(torch.int16)).sum().item()
            assert mismatch == 0, f"{dtype} alpha={alpha} slice {lo}:{hi}: {mismatch} elements differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bounded_lerp_stays_between_its_inputs(dtype):
    """weighted_sum declares itself bounded for 0 <= alpha <= 1 (the live merge then checks inputs
    once instead of every output): at the dtype's extremes the kernel's output must stay finite
    and between its two inputs."""
    spec = get_method("weighted_sum")
    assert spec.bounded is not None
    assert spec.bounded(alpha=0.0) and spec.bounded(alpha=1.0) and spec.bounded(alpha=0.37)
    assert not spec.bounded(alpha=-0.1) and not spec.bounded(alpha=1.5)
    finfo = torch.finfo(dtype)
    limit = finfo.max if dtype == torch.float16 else 1e30  # the live merge's input bound for bf16
    g = torch.Generator().manual_seed(3)
    a = torch.cat([torch.tensor([limit, -limit, limit, finfo.tiny, 0.0]), (torch.rand(50_000, generator=g) * 2 - 1) * limit])
    b = torch.cat([torch.tensor([-limit, limit, limit, -finfo.tiny, -0.0]), (torch.rand(50_000, generator=g) * 2 - 1) * limit])
    a, b = a.to(dtype), b.to(dtype)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    for alpha in (0.0, 1e-3, 0.25, 0.5, 0.75, 0.999, 1.0):
        out = torch.empty_like(a)
        spec.native(out, a, b, alpha=alpha)
        assert torch.isfinite(out).all(), alpha
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        assert bool(((out >= low) & (out <= high)).all()), alpha


def test_bounded_is_declared_only_where_it_holds():
    bounded = {spec.name for spec in all_methods() if spec.bounded is not None}
    assert bounded <= {"weighted_sum"}, bounded


def test_only_exact_methods_declare_a_native_kernel():
    natives = {spec.name for spec in all_methods() if spec.native is not None}
    assert natives <= {"weighted_sum"}, natives


# ---- registry ------------------------------------------------------------------------------------


def test_registry_lists_the_required_methods():
    names = {spec.name for spec in all_methods()}
    required = {"weighted_sum", "add_difference", "triple_sum", "sum_twice", "soup", "slerp", "bislerp",
                "train_difference"}
    assert required <= names
    for spec in all_methods():
        assert spec.help, spec.name
        for p in spec.params:
            assert p.help, (spec.name, p.name)


@pytest.mark.parametrize("typo,nearest", [("weighted_sun", "weighted_sum"), ("slerpp", "slerp"),
                                          ("add_diference", "add_difference")])
def test_unknown_method_suggests_nearest(typo, nearest):
    with pytest.raises(UnknownMethodError) as err:
        get_method(typo)
    message = str(err.value)
    assert typo in message
    assert f"did you mean {nearest!r}" in message


def test_unknown_method_without_close_match_lists_available():
    with pytest.raises(UnknownMethodError) as err:
        get_method("zzzzqqq")
    assert "did you mean" not in str(err.value)
    assert "weighted_sum" in str(err.value)


def test_unknown_parameter_names_method_and_valid_parameters():
    with pytest.raises(BadParameterError) as err:
        get_method("add_difference").resolve_params({"gamma": 1})
    message = str(err.value)
    assert "add_difference" in message and "'gamma'" in message and "alpha" in message


def test_wrong_type_names_method():
    with pytest.raises(BadParameterError, match="weighted_sum.*alpha"):
        get_method("weighted_sum").resolve_params({"alpha": "half"})


def test_parameter_defaults_and_coercion():
    resolved = get_method("triple_sum").resolve_params({"alpha": "0.25"})
    assert resolved == {"alpha": 0.25, "beta": 0.5}
    assert get_method("soup").resolve_params({}) == {"model_weights": ""}


def _ranged_spec() -> MethodSpec:
    params = (
        Param("rate", float, 0.5, "drop rate", minimum=0.0, maximum=1.0),
        Param("count", int, 2, "how many", minimum=1),
        Param("mode", str, "sum", "vote", choices=("sum", "count")),
        Param("rescale", bool, True, "rescale"),
    )
    return MethodSpec("ranged_demo", lambda *a, **k: a[0], ("A", "B"), params, "demo")


@pytest.mark.parametrize(
    "given,fragment",
    [
        ({"rate": 1.5}, "rate=1.5 is outside [0.0, 1.0]"),
        ({"rate": -0.1}, "rate=-0.1 is outside"),
        ({"count": 0}, "count=0 is outside"),
        ({"count": 2.5}, "is not a int"),
        ({"mode": "mean"}, "choose one of sum, count"),
        ({"rescale": "maybe"}, "is not a bool"),
    ],
)
def test_out_of_range_values_name_the_method(given, fragment):
    with pytest.raises(BadParameterError) as err:
        _ranged_spec().resolve_params(given)
    assert str(err.value).startswith("ranged_demo:")
    assert fragment in str(err.value)


def test_in_range_values_are_coerced():
    resolved = _ranged_spec().resolve_params({"rate": "1", "count": "3", "rescale": "off"})
    assert resolved == {"rate": 1.0, "count": 3, "mode": "sum", "rescale": False}


def test_model_count_checked():
    with pytest.raises(BadParameterError, match="add_difference takes 3 models"):
        get_method("add_difference").check_model_count(2)
    with pytest.raises(BadParameterError, match="soup takes at least 2"):
        get_method("soup").check_model_count(1)
    get_method("soup").check_model_count(7)
    with pytest.raises(BadParameterError, match="weighted_sum"):
        get_method("weighted_sum").check_model_count(3)


# ---- randomness ----------------------------------------------------------------------------------


def test_key_context_generator_is_deterministic_per_seed_and_key():
    def draw(seed: int, key: str, salt: str = "") -> torch.Tensor:
        return torch.randn(64, generator=KeyContext(key, "BASE", seed).generator(salt))

    k1, k2 = "model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"
    assert torch.equal(draw(3, k1), draw(3, k1))
    # the block is not part of the seed: only (seed, key, salt)
    assert torch.equal(
        torch.randn(8, generator=KeyContext(k1, "OUT11", 3).generator()),
        torch.randn(8, generator=KeyContext(k1, "BASE", 3).generator()),
    )
    assert not torch.equal(draw(3, k1), draw(4, k1))
    assert not torch.equal(draw(3, k1), draw(3, k2))
    assert not torch.equal(draw(3, k1), draw(3, k1, "other"))
    assert key_seed(3, k1) == key_seed(3, k1) != key_seed(3, k2)
    assert 0 <= key_seed(2**40, k1) < 2**63


def test_generator_does_not_depend_on_draw_order():
    keys = [f"k{i}" for i in range(20)]
    forward = {k: torch.randn(4, generator=KeyContext(k, seed=9).generator()) for k in keys}
    backward = {k: torch.randn(4, generator=KeyContext(k, seed=9).generator()) for k in reversed(keys)}
    for k in keys:
        assert torch.equal(forward[k], backward[k])
