"""Planning and execution end to end on small synthetic SD1 / SDXL checkpoints: values against a
reference computed here from the loaded tensors, copy/drop rules, header-only rejection of bad
inputs, virtual inputs, determinism, recipes, failures that must leave no file, and metadata."""
from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from lib_merge import cli
from lib_merge.arch import block_of
from lib_merge.blocks import parse_block_weights
from lib_merge.engine import merge
from lib_merge.errors import (
    ArchitectureMismatchError,
    BadParameterError,
    MergeCancelled,
    NonFiniteError,
    OutputPathError,
)
from lib_merge.inputs import VirtualInput, parse_model_ref
from lib_merge.io.reader import SafetensorsReader
from lib_merge.plan import open_inputs, plan_merge
from lib_merge.recipe import Recipe, load_recipe

from tests.files import leftovers, load_tensors, read_metadata


POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
TIME_EMBED = "model.diffusion_model.time_embed.0.weight"


def expected_kind(key: str, t: torch.Tensor) -> str:
    """The copy/drop rules of the issue, restated independently of lib_merge.arch.key_kind."""
    if key.startswith("model_ema.") and key not in ("model_ema.decay", "model_ema.num_updates"):
        return "drop"
    if not t.is_floating_point() or key in ("v_pred", "ztsnr") or key.endswith("logit_scale"):
        return "copy"
    if t.dim() == 0 or t.numel() == 0:
        return "copy"
    return "merge"


def reference_weighted_sum(a_path, b_path, arch, weights, alpha=0.0, *, policy="supermerger",
                           dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A + α(B − A) in fp32 (torch.lerp), α from the block of each key, cast once."""
    A, B = load_tensors(a_path), load_tensors(b_path)
    per_block = parse_block_weights(weights, arch, base=alpha)
    out = {}
    for key, a in A.items():
        kind = expected_kind(key, a)
        if kind == "drop":
            continue
        if kind == "copy" or key not in B:
            out[key] = a
            continue
        if B[key].shape != a.shape:  # inpainting conv_in: checked by its own tests
            continue
        out[key] = torch.lerp(a.float(), B[key].float(), per_block[block_of(arch, key, policy)]).to(dtype)
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (set(got) ^ set(want))
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} keys differ, e.g. {bad[:3]}"


def run_merge(models, out: Path, method="weighted_sum", **kwargs) -> tuple:
    warnings: list[str] = []
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in Recipe.__dataclass_fields__}
    recipe = Recipe(method=method, models=tuple(str(m) for m in models), **fields)
    kwargs.setdefault("durable", False)
    result = merge(recipe, out, warn=warnings.append, **kwargs)
    return result, warnings


# ---- weighted sum against the reference ----------------------------------------------------------


@pytest.mark.parametrize(
    "arch,weights,alpha",
    [
        ("sd1", "GRAD_V,BASE=0.3", None),
        ("sd1", "0.1,0,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,0.25,0.75,0.5,1,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0,0.35", None),
        ("sdxl", "SMOOTHSTEP,IN04=0.3,BASE=0.6", None),
    ],
)
def test_weighted_sum_matches_reference(models, out_dir, arch, weights, alpha):
    a, b = getattr(models, f"{arch}_a"), getattr(models, f"{arch}_b")
    out = out_dir / "merged.safetensors"
    result, warnings = run_merge([a, b], out, weights=weights, alpha=alpha)
    assert warnings == []
    assert result.path == out and out.exists()
    got = load_tensors(out)
    want = reference_weighted_sum(a, b, arch, weights, 0.5 if alpha is None else alpha)
    assert_same_tensors(got, want)
    A, B = load_tensors(a), load_tensors(b)
    # α is B's share: the formula A + α(B − A) holds to fp16 rounding, with the block's own α
    per_block = parse_block_weights(weights, arch, base=0.5 if alpha is None else alpha)
    assert len(set(per_block.values())) > 3  # the weights really vary per block
    for key in ("model.diffusion_model.output_blocks.2.1.conv.weight" if arch == "sd1" else
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "model.diffusion_model.input_blocks.4.1.proj_in.weight", CONV_IN):
        w = per_block[block_of(arch, key)]
        naive = A[key].float() + w * (B[key].float() - A[key].float())
        torch.testing.assert_close(got[key].float(), naive, rtol=2e-3, atol=1e-5)


def test_block_policy_changes_time_embed_block(models, out_dir):
    a, b = models.sd1_a, models.sd1_b
    A, B = load_tensors(a), load_tensors(b)
    run_merge([a, b], out_dir / "sm.safetensors", weights="IN00=1", alpha=0.0)
    run_merge([a, b], out_dir / "mecha.safetensors", weights="IN00=1", alpha=0.0, blocks="sd-mecha")
    sm, mecha = load_tensors(out_dir / "sm.safetensors"), load_tensors(out_dir / "mecha.safetensors")
    assert torch.equal(sm[TIME_EMBED], B[TIME_EMBED])  # supermerger: time_embed is IN00 → B
    assert torch.equal(mecha[TIME_EMBED], A[TIME_EMBED])  # sd-mecha: time_embed is BASE → A
    assert torch.equal(sm[CONV_IN], B[CONV_IN]) and torch.equal(mecha[CONV_IN], B[CONV_IN])
    assert json.loads(read_metadata(out_dir / "mecha.safetensors")["lib_merge_recipe"])["blocks"] == "sd-mecha"


def test_output_dtypes_and_fast_path(models, out_dir):
    """fp16 inputs → fp16 output takes the native kernel; bf16 / fp32 outputs the fp32 path: each
    equals the reference, and the fp16 file is the fp32 file cast (the fast path changes no bit)."""
    a, b = models.sd1_a, models.sd1_b
    got = {}
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = out_dir / f"{dtype}.safetensors"
        run_merge([a, b], out, alpha=0.37, weights="GRAD_A,OUT05=0.9", dtype=dtype)
        got[dtype] = load_tensors(out)
        assert_same_tensors(got[dtype], reference_weighted_sum(a, b, "sd1", "GRAD_A,OUT05=0.9", 0.37, dtype=torch_dtype))
        merged = [k for k, t in got[dtype].items() if t.is_floating_point()]
        assert len(merged) > 1000 and all(got[dtype][k].dtype == torch_dtype for k in merged)
        assert got[dtype][POSITION_IDS].dtype == torch.int64
        assert json.loads(read_metadata(out)["lib_merge_recipe"])["dtype"] == dtype
    for key, t in got["fp32"].items():
        assert torch.equal(got["fp16"][key], t.half() if t.dtype == torch.float32 else t), key


# ---- copy / drop / missing keys ------------------------------------------------------------------


@pytest.fixture
def sd1_with_extras(models):
    """A with EMA weights, EMA counters and a v_pred marker; B with the same extras, lacking one key."""
    A = load_tensors(models.sd1_a)
    ema_key = "model_ema.diffusion_modelinput_blocks00weight"
    extras = {
        ema_key: torch.randn(A[CONV_IN].shape).half(),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "v_pred": torch.tensor([]),
    }
    a = models.derive(models.sd1_a, "a_extras.safetensors", add=extras)
    missing = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    b_extras = {k: (v.float() + 1 if v.is_floating_point() else v + 5) for k, v in extras.items()}
    b_extras["v_pred"] = torch.tensor([1.0])  # B's marker differs: the output must carry A's
    b_extras[POSITION_IDS] = A[POSITION_IDS].flip(-1).contiguous()  # so would any averaging or B's copy
    b = models.derive(models.sd1_b, "b_missing.safetensors", add=b_extras, drop=[missing])
    return a, b, missing, ema_key


def test_copy_drop_and_missing_keys(sd1_with_extras, out_dir):
    a, b, missing, ema_key = sd1_with_extras
    out = out_dir / "m.safetensors"
    result, warnings = run_merge([a, b], out, alpha=0.5)
    A, got = load_tensors(a), load_tensors(out)
    # position_ids (int64) copied from A bit-exactly, never averaged with B's
    assert got[POSITION_IDS].dtype == torch.int64 and torch.equal(got[POSITION_IDS], A[POSITION_IDS])
    # EMA shadow weights dropped; the EMA counters and the v_pred marker copied from A
    assert not any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in got)
    assert ema_key not in got
    assert torch.equal(got["model_ema.decay"], A["model_ema.decay"])
    assert "v_pred" in got and got["v_pred"].shape == (0,) and got["v_pred"].dtype == A["v_pred"].dtype
    assert torch.equal(got["model_ema.num_updates"], A["model_ema.num_updates"])
    # the key B lacks is A's tensor, and exactly one warning says so
    assert torch.equal(got[missing], A[missing])
    assert len(warnings) == 1 and missing in warnings[0] and "copied from A" in warnings[0]
    assert result.warnings == warnings
    # everything else is the plain reference
    assert_same_tensors(got, reference_weighted_sum(a, b, "sd1", None, 0.5))


def test_missing_key_warning_ignores_dropped_ema_keys(models, out_dir):
    # A is an unpruned checkpoint (with EMA weights), B a pruned one: nothing is really missing.
    A = load_tensors(models.sd1_a)
    ema = {f"model_ema.w{i}": torch.randn(4).half() for i in range(3)}
    a = models.derive(models.sd1_a, "unpruned.safetensors", add=ema)
    _, warnings = run_merge([a, models.sd1_b], out_dir / "m.safetensors", alpha=0.5)
    assert set(load_tensors(out_dir / "m.safetensors")) == set(A)
    assert warnings == [], warnings


def test_mismatched_architectures_rejected_before_reading_data(models, out_dir, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read before the architecture check")

    monkeypatch.setattr(SafetensorsReader, "get", no_data)
    monkeypatch.setattr(SafetensorsReader, "read_into", no_data)
    monkeypatch.setattr("lib_merge.engine.run.sha256_file", no_data)  # hashing reads whole files too
    out = out_dir / "m.safetensors"
    for pair in ([models.sd1_a, models.sdxl_a], [models.sdxl_a, models.sd1_a]):
        with pytest.raises(ArchitectureMismatchError) as err:
            run_merge(pair, out, alpha=0.5)
        message = str(err.value)
        assert pair[0].name in message and pair[1].name in message
        assert "SDXL" in message
    assert list(out_dir.iterdir()) == []
    # control: the same patches do trip on a merge that gets past planning
    with pytest.raises(AssertionError, match="tensor data was read"):
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5, hash_inputs=False)


def test_shape_mismatch_lists_every_key(models, out_dir):
    keys = ["model.diffusion_model.middle_block.0.in_layers.2.weight",
            "first_stage_model.decoder.conv_in.weight"]
    B = load_tensors(models.sd1_b)
    changed = {k: torch.zeros(B[k].shape[0] + 1, *B[k].shape[1:], dtype=B[k].dtype) for k in keys}
    b = models.derive(models.sd1_b, "bad_shape.safetensors", replace=changed)
    with pytest.raises(ArchitectureMismatchError) as err:
        run_merge([models.sd1_a, b], out_dir / "m.safetensors", alpha=0.5)
    message = str(err.value)
    for key in keys:
        assert key in message
    assert "\n" not in message
    assert list(out_dir.iterdir()) == []


# ---- inpainting ----------------------------------------------------------------------------------


def test_inpainting_a_with_normal_b_merges_shared_channels(models, out_dir):
    a, b = models.sd1_inpaint, models.sd1_b
    out = out_dir / "inp.safetensors"
    _, warnings = run_merge([a, b], out, alpha=0.4)
    A, B, got = load_tensors(a), load_tensors(b), load_tensors(out)
    assert A[CONV_IN].shape[1] == 9 and B[CONV_IN].shape[1] == 4
    conv = got[CONV_IN]
    assert conv.shape == A[CONV_IN].shape
    want_first = torch.lerp(A[CONV_IN][:, :4].float(), B[CONV_IN].float(), 0.4).half()
    assert torch.equal(conv[:, :4], want_first)
    assert torch.equal(conv[:, 4:], A[CONV_IN][:, 4:])  # the 5 extra channels come from A
    assert any("inpainting" in w for w in warnings)
    others = {k: v for k, v in got.items() if k != CONV_IN}
    want = reference_weighted_sum(a, b, "sd1", None, 0.4)
    assert_same_tensors(others, want)
    reader = SafetensorsReader(out)
    try:
        assert json.loads(reader.metadata["sd_merge_recipe"])["is_inpainting"] is True
        assert reader.metadata["modelspec.architecture"].endswith("/inpaint")
    finally:
        reader.close()


def test_normal_a_with_inpainting_b_merges_shared_channels(models, out_dir):
    a, b = models.sd1_a, models.sd1_inpaint
    out = out_dir / "inp2.safetensors"
    run_merge([a, b], out, alpha=0.75)
    A, B, got = load_tensors(a), load_tensors(b), load_tensors(out)
    assert got[CONV_IN].shape == A[CONV_IN].shape == (A[CONV_IN].shape[0], 4, 3, 3)
    assert torch.equal(got[CONV_IN], torch.lerp(A[CONV_IN].float(), B[CONV_IN][:, :4].float(), 0.75).half())


# ---- virtual inputs ------------------------------------------------------------------------------


def test_parse_model_ref():
    assert parse_model_ref("models/a.safetensors") == "models/a.safetensors"
    assert parse_model_ref("zero") == VirtualInput("zero")
    assert parse_model_ref(" noise ( seed=3 , scale=0.5 ) ") == VirtualInput("noise", 3, 0.5)
    assert parse_model_ref("NOISE") == VirtualInput("noise", 0, 1.0)
    for bad in ("noise(seed=x)", "noise(3)", "noise(sigma=1)", "zero(seed=1)"):
        with pytest.raises(BadParameterError):
            parse_model_ref(bad)


def test_zero_input(models, out_dir):
    a = models.sd1_a
    out = out_dir / "z.safetensors"
    run_merge([a, "zero"], out, alpha=0.25)
    A, got = load_tensors(a), load_tensors(out)
    for key, t in A.items():
        if expected_kind(key, t) == "merge":
            assert torch.equal(got[key], torch.lerp(t.float(), torch.zeros_like(t, dtype=torch.float32), 0.25).half()), key
        else:
            assert torch.equal(got[key], t), key
    meta = read_metadata(out)
    recipe = json.loads(meta["lib_merge_recipe"])
    assert recipe["models"][1] == "zero" and recipe["model_hashes"][1] == ""


def test_noise_input_scale_and_determinism(models, out_dir):
    a = models.sd1_a
    spec = "noise(seed=7,scale=0.5)"
    out = out_dir / "n.safetensors"
    run_merge([a, spec], out, alpha=1.0)
    A, got = load_tensors(a), load_tensors(out)
    virtual, other_seed = parse_model_ref(spec), parse_model_ref("noise(seed=8,scale=0.5)")
    checked = 0
    for key, t in A.items():
        if expected_kind(key, t) != "merge":
            assert torch.equal(got[key], t), key
            continue
        # deterministic per key: the same as generating that key alone, outside any merge
        assert torch.equal(got[key], virtual.make(key, t).half()), key
        if t.numel() >= 4096:
            ratio = got[key].float().std().item() / (0.5 * t.float().std().item())
            assert 0.9 < ratio < 1.1, (key, ratio)
            assert abs(got[key].float().mean().item()) < 0.1 * got[key].float().std().item() + 1e-4
            assert not torch.equal(virtual.make(key, t), other_seed.make(key, t))
            checked += 1
    assert checked > 20
    # different keys get different noise even with equal shapes
    k1 = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    k2 = "model.diffusion_model.input_blocks.2.1.proj_in.weight"
    assert got[k1].shape == got[k2].shape and not torch.equal(got[k1] / got[k1].std(), got[k2] / got[k2].std())


def reference_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Whole-tensor slerp of directions, lerped norm, in float64 (independent of the library)."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm(), y.norm()
    cos = torch.clamp(torch.dot(x / nx, y / ny), -1, 1)
    theta = torch.arccos(cos)
    out = (torch.sin((1 - t) * theta) * x / nx + torch.sin(t * theta) * y / ny) / torch.sin(theta)
    return (out * ((1 - t) * nx + t * ny)).reshape(a.shape)


def test_slerp_with_noise_is_deterministic_across_threads(models, out_dir):
    a = models.sd1_a
    for threads in (1, 4):
        run_merge([a, "noise(seed=1,scale=1)"], out_dir / f"s{threads}.safetensors", method="slerp", alpha=0.3,
                  threads=threads)
    out = out_dir / "s1.safetensors"
    assert out.read_bytes() == (out_dir / "s4.safetensors").read_bytes()
    A, got = load_tensors(a), load_tensors(out)
    virtual = parse_model_ref("noise(seed=1,scale=1)")
    checked = 0
    for i, (key, t) in enumerate(A.items()):
        if expected_kind(key, t) != "merge" or t.numel() < 64 or i % 3:
            continue
        noise = virtual.make(key, t)
        want = reference_slerp(t.float(), noise, 0.3)
        torch.testing.assert_close(got[key].double(), want, rtol=2e-3, atol=2e-5, msg=key)
        # a slerp keeps the lerped norm, unlike a lerp towards near-orthogonal noise
        norm_want = 0.7 * t.double().norm() + 0.3 * noise.double().norm()
        assert got[key].double().norm().item() == pytest.approx(norm_want.item(), rel=5e-3)
        checked += 1
    assert checked > 100


def test_virtual_model_a_is_refused(models, out_dir):
    with pytest.raises(BadParameterError, match="model A must be a checkpoint"):
        run_merge(["zero", models.sd1_a], out_dir / "m.safetensors", alpha=0.5)


# ---- other methods end to end --------------------------------------------------------------------


def test_add_difference_and_soup_end_to_end(models, out_dir):
    a, b, c = models.sd1_a, models.sd1_b, models.sd1_c
    run_merge([a, b, c], out_dir / "ad.safetensors", method="add_difference", alpha=0.7, dtype="fp32")
    run_merge([a, b, c], out_dir / "soup.safetensors", method="soup", params={"model_weights": "1,2,1"}, dtype="fp32")
    A, B, C = load_tensors(a), load_tensors(b), load_tensors(c)
    ad, soup = load_tensors(out_dir / "ad.safetensors"), load_tensors(out_dir / "soup.safetensors")
    for key, t in A.items():
        if expected_kind(key, t) != "merge":
            assert torch.equal(ad[key], t) and torch.equal(soup[key], t), key
            continue
        x, y, z = t.float(), B[key].float(), C[key].float()
        torch.testing.assert_close(ad[key], x + 0.7 * (y - z), rtol=1e-6, atol=1e-7, msg=key)
        torch.testing.assert_close(soup[key], 0.25 * x + 0.5 * y + 0.25 * z, rtol=1e-5, atol=1e-7, msg=key)


def test_bad_method_parameters_fail_before_writing(models, out_dir):
    with pytest.raises(BadParameterError, match="soup"):
        run_merge([models.sd1_a, models.sd1_b], out_dir / "m.safetensors", method="soup", alpha=0.5)
    with pytest.raises(BadParameterError, match="weighted_sum.*gamma"):
        run_merge([models.sd1_a, models.sd1_b], out_dir / "m.safetensors", params={"gamma": 1})
    with pytest.raises(BadParameterError, match="takes 3 models"):
        run_merge([models.sd1_a, models.sd1_b], out_dir / "m.safetensors", method="add_difference")
    assert list(out_dir.iterdir()) == []


# ---- determinism and recipes ---------------------------------------------------------------------


def test_thread_count_does_not_change_the_bytes(models, out_dir):
    a, b, c = models.sd1_a, models.sd1_b, models.sd1_c
    for threads in (1, 4):
        run_merge([a, b, c], out_dir / f"t{threads}.safetensors", method="train_difference", alpha=0.6,
                  weights="GRAD_V", threads=threads)
    assert (out_dir / "t1.safetensors").read_bytes() == (out_dir / "t4.safetensors").read_bytes()


def test_recipe_rerun_from_merged_file_is_bit_identical(models, out_dir, capsys):
    a, b = models.sd1_a, models.sd1_b
    first = out_dir / "first.safetensors"
    assert cli.main(["merge", str(a), str(b), "-o", str(first), "--weights", "GRAD_A,BASE=0.2", "--alpha", "0.4",
                     "--dtype", "bf16", "--threads", "3"]) == 0
    again = out_dir / "again.safetensors"
    assert cli.main(["merge", "--recipe", str(first), "-o", str(again), "--threads", "1"]) == 0
    assert first.read_bytes() == again.read_bytes()
    recipe = load_recipe(first)
    assert Path(recipe.models[0]).resolve() == a.resolve() and recipe.dtype == "bf16"
    assert recipe.weights == "GRAD_A,BASE=0.2" and recipe.alpha == 0.4


def test_recipe_json_with_relative_paths(models, out_dir, tmp_path, monkeypatch, capsys):
    a, b = models.sd1_a, models.sd1_b
    weights = [0.5, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 0, 0.25, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3,
               0.2, 0.1, 0, 0.75]
    recipe_file = models.dir / "recipe.json"
    recipe_file.write_text(json.dumps({
        "version": 1, "method": "weighted_sum", "models": [a.name, b.name], "alpha": 0.5,
        "weights": weights, "params": {}, "seed": 0, "dtype": "fp16", "blocks": "supermerger",
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths are relative to the recipe, not the cwd
    out = out_dir / "from_recipe.safetensors"
    assert cli.main(["merge", "--recipe", str(recipe_file), "-o", str(out)]) == 0
    assert_same_tensors(load_tensors(out), reference_weighted_sum(a, b, "sd1", weights, 0.5))
    # the stored recipe is relative to the output's folder and resolves back to the inputs
    stored = json.loads(read_metadata(out)["lib_merge_recipe"])
    assert stored["models"] == [f"../models/{a.name}", f"../models/{b.name}"]
    assert stored["weights"] == weights
    assert [Path(m).resolve() for m in load_recipe(out).models] == [a.resolve(), b.resolve()]


def test_bf16_input_to_fp16_output_warns(models, out_dir):
    from lib_merge.synthetic import write_synthetic_checkpoint

    a = write_synthetic_checkpoint(models.dir / "a_bf16.safetensors", "sd1", width_divisor=32, dtype=torch.bfloat16)
    _, warnings = run_merge([a, models.sd1_b], out_dir / "m.safetensors", alpha=0.5)
    assert len(warnings) == 1 and "bf16" in warnings[0] and "--dtype bf16" in warnings[0]
    _, warnings = run_merge([a, models.sd1_b], out_dir / "m2.safetensors", alpha=0.5, dtype="bf16")
    assert warnings == []


# ---- failures leave no file ----------------------------------------------------------------------


def test_nan_in_input_names_key_and_model(models, out_dir):
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    B = load_tensors(models.sd1_b)
    poisoned = B[key].clone()
    poisoned.view(-1)[3] = float("nan")
    b = models.derive(models.sd1_b, "b_nan.safetensors", replace={key: poisoned})
    out = out_dir / "nan.safetensors"
    for dtype in ("fp16", "fp32"):  # native kernel and fp32 path
        with pytest.raises(NonFiniteError) as err:
            run_merge([models.sd1_a, b], out, alpha=0.5, dtype=dtype)
        message = str(err.value)
        assert key in message and "b_nan.safetensors" in message and "B (" in message
        assert leftovers(out_dir, out.name) == []


def _poison(models, src: Path, name: str, key: str, value: float = float("nan"), **changes) -> Path:
    tensor = load_tensors(src)[key].clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    return models.derive(src, name, replace={key: tensor}, **changes)


TEXT_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
M00_KEY = "model.diffusion_model.middle_block.1.proj_out.weight"


@pytest.mark.parametrize("case", ["alpha0", "base0_grad_v", "m00_zero", "only_in_a", "schedule_buffer", "fp32_to_fp16"])
def test_non_finite_value_copied_from_an_input_is_refused(models, out_dir, case):
    """Keys written straight from A (a block at ratio 0, a key B lacks, a copied buffer) get the
    refusal merged keys get: key, model and file named, no file left."""
    key, value, kwargs, changes = TEXT_KEY, float("nan"), {"alpha": 0.0}, {}
    if case == "base0_grad_v":  # GRAD_V's BASE is 0: the text encoder is copied from A
        key, value, kwargs = TEXT_KEY, float("inf"), {"weights": "GRAD_V"}
    elif case == "m00_zero":
        key, kwargs = M00_KEY, {"alpha": 0.5, "weights": "M00=0"}
    elif case == "only_in_a":
        key, kwargs = M00_KEY, {"alpha": 0.5}
    elif case == "schedule_buffer":  # float, but never averaged ("copy" kind)
        key, kwargs, changes = "alphas_cumprod", {"alpha": 0.5}, {"add": {"alphas_cumprod": torch.linspace(1, 0.1, 8)}}
    a = models.sd1_a
    if case == "schedule_buffer":
        a = models.derive(a, "a_buf.safetensors", **changes)
    bad = _poison(models, a, "a_bad.safetensors", key, value)
    b = models.derive(models.sd1_b, "b_lacks.safetensors", drop=[key]) if case == "only_in_a" else models.sd1_b
    if case == "fp32_to_fp16":  # A in fp32 with a value beyond fp16's range: the cast overflows
        big = load_tensors(models.sd1_a)[key].float().clone()
        big.view(-1)[5] = 1e6
        bad = models.derive(models.sd1_a, "a_big.safetensors", replace={key: big})
    out = out_dir / "copied.safetensors"
    with pytest.raises(NonFiniteError) as err:
        run_merge([bad, b], out, **kwargs)
    message = str(err.value)
    assert key in message and bad.name in message and "\n" not in message
    assert ("A (" in message) and (("fp16" in message or "float16" in message) if case == "fp32_to_fp16" else "NaN/Inf" in message)
    assert leftovers(out_dir, out.name) == []


def test_non_finite_value_in_a_baked_vae_is_refused(models, out_dir):
    from safetensors.torch import save_file

    vae_key = "first_stage_model.decoder.conv_out.weight"
    vae = {k[len("first_stage_model."):]: v for k, v in load_tensors(models.sd1_b).items()
           if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.weight"].view(-1)[0] = float("nan")
    path = models.dir / "bad.vae.safetensors"
    save_file(vae, str(path))
    out = out_dir / "vae.safetensors"
    with pytest.raises(NonFiniteError) as err:
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5, vae=str(path))
    assert vae_key in str(err.value) and "VAE (bad.vae.safetensors)" in str(err.value)
    assert leftovers(out_dir, out.name) == []


def test_integer_tensors_and_finite_copies_still_pass(models, out_dir):
    """The copy check leaves integers alone and does not change a copied key's bytes."""
    out = out_dir / "ok.safetensors"
    run_merge([models.sd1_a, models.sd1_b], out, alpha=0.0)
    got, A = load_tensors(out), load_tensors(models.sd1_a)
    assert torch.equal(got[POSITION_IDS], A[POSITION_IDS])
    assert all(torch.equal(got[k], A[k]) for k in A if not k.startswith("model_ema."))


def test_failed_merge_leaves_the_callers_cancel_event_alone(models, out_dir):
    key = "model.diffusion_model.out.2.weight"
    B = load_tensors(models.sd1_b)
    poisoned = B[key].clone()
    poisoned.view(-1)[0] = float("nan")
    b = models.derive(models.sd1_b, "b_nan.safetensors", replace={key: poisoned})
    cancel = threading.Event()
    with pytest.raises(NonFiniteError):
        run_merge([models.sd1_a, b], out_dir / "m.safetensors", alpha=0.5, cancel=cancel)
    assert not cancel.is_set()


def test_inf_produced_by_method_is_reported(models, out_dir):
    # add_difference with a huge α overflows fp16: the method, not an input, is blamed
    out = out_dir / "inf.safetensors"
    with pytest.raises(NonFiniteError, match="add_difference produced NaN/Inf"):
        run_merge([models.sd1_a, models.sd1_b, models.sd1_c], out, method="add_difference", alpha=1e9)
    assert leftovers(out_dir, out.name) == []


def test_cancel_from_progress_callback(models, out_dir):
    cancel = threading.Event()
    calls = []

    def progress(done, total, key):
        calls.append((done, total, key))
        if len(calls) == 3:
            cancel.set()

    out = out_dir / "c.safetensors"
    with pytest.raises(MergeCancelled) as err:
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5, progress=progress, cancel=cancel, threads=2)
    assert str(out) in str(err.value)
    assert 3 <= len(calls) < 200
    assert leftovers(out_dir, out.name) == []


def test_keyboard_interrupt_in_worker_is_a_clean_cancel(models, out_dir):
    def progress(done, total, key):
        raise KeyboardInterrupt

    out = out_dir / "k.safetensors"
    with pytest.raises(MergeCancelled):
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5, progress=progress)
    assert leftovers(out_dir, out.name) == []


def test_progress_reports_every_byte(models, out_dir):
    seen = []
    result, _ = run_merge([models.sd1_a, models.sd1_b], out_dir / "p.safetensors", alpha=0.5,
                          progress=lambda d, t, k: seen.append((d, t, k)))
    total = seen[0][1]
    assert all(t == total for _, t, _ in seen)
    assert max(d for d, _, _ in seen) == total == result.bytes_written
    assert len({k for _, _, k in seen}) == len(seen) == len(load_tensors(result.path))


def test_full_disk_during_merge(models, out_dir, monkeypatch):
    import errno
    import os

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:  # header and a few tensors fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = out_dir / "full.safetensors"
    with pytest.raises(OutputPathError) as err:
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5)
    assert "disk space" in str(err.value) and "\n" not in str(err.value)
    assert leftovers(out_dir, out.name) == []


def test_output_over_an_input_refused(models):
    a, b = models.sd1_a, models.sd1_b
    before = a.read_bytes()
    with pytest.raises(OutputPathError, match="input of the merge"):
        run_merge([a, b], a, alpha=0.5, overwrite=True)
    assert a.read_bytes() == before
    assert leftovers(models.dir, a.name) == [a]


def test_existing_output_needs_overwrite(models, out_dir):
    out = out_dir / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5)
    assert out.read_bytes() == b"keep me"
    run_merge([models.sd1_a, models.sd1_b], out, alpha=0.5, overwrite=True)
    assert_same_tensors(load_tensors(out), reference_weighted_sum(models.sd1_a, models.sd1_b, "sd1", None, 0.5))


# ---- metadata and hashes -------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_metadata_and_hashes(models, out_dir):
    a, b, c = models.sd1_a, models.sd1_b, models.sd1_c
    out = out_dir / "meta.safetensors"
    result, _ = run_merge([a, b, c], out, method="add_difference", alpha=0.35, weights="IN05=0.1")
    meta = read_metadata(out)
    recipe = Recipe.from_json(meta["lib_merge_recipe"])
    assert recipe.method == "add_difference" and recipe.alpha == 0.35 and recipe.weights == "IN05=0.1"
    assert recipe.version == 1 and recipe.dtype == "fp16" and recipe.blocks == "supermerger"
    hashes = [sha256(p) for p in (a, b, c)]
    assert list(recipe.model_hashes) == hashes
    a1111 = json.loads(meta["sd_merge_recipe"])
    assert a1111["primary_model_hash"] == hashes[0]
    assert a1111["secondary_model_hash"] == hashes[1]
    assert a1111["tertiary_model_hash"] == hashes[2]
    assert a1111["interp_method"] == "add_difference" and a1111["multiplier"] == 0.35
    alpha_blocks = a1111["block_weights"]["alpha"].split(",")
    assert len(alpha_blocks) == 26 and float(alpha_blocks[6]) == 0.1 and float(alpha_blocks[5]) == 0.35
    models_meta = json.loads(meta["sd_merge_models"])
    assert set(models_meta) == set(hashes)
    assert models_meta[hashes[1]]["name"] == "sd1_b"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert result.sha256 == sha256(out) and result.short_hash == sha256(out)[:10]


def test_merge_history_is_carried_over(models, out_dir):
    first = out_dir / "first.safetensors"
    run_merge([models.sd1_a, models.sd1_b], first, alpha=0.5)
    second = out_dir / "second.safetensors"
    run_merge([first, models.sd1_c], second, alpha=0.5)
    history = json.loads(read_metadata(second)["sd_merge_models"])
    for p in (models.sd1_a, models.sd1_b, models.sd1_c, first):
        assert sha256(p) in history, p.name
    assert history[sha256(first)]["sd_merge_recipe"]["interp_method"] == "weighted_sum"


def test_merge_from_ckpt_equals_merge_from_safetensors(models, out_dir):
    ckpt = models.dir / "sd1_b.ckpt"
    torch.save({"state_dict": load_tensors(models.sd1_b), "global_step": 5}, ckpt)
    run_merge([models.sd1_a, ckpt], out_dir / "from_ckpt.safetensors", alpha=0.3, weights="GRAD_V")
    run_merge([models.sd1_a, models.sd1_b], out_dir / "from_st.safetensors", alpha=0.3, weights="GRAD_V")
    assert_same_tensors(load_tensors(out_dir / "from_ckpt.safetensors"),
                        load_tensors(out_dir / "from_st.safetensors"))


def test_plan_is_made_from_headers_only(models, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data read during planning")

    monkeypatch.setattr(SafetensorsReader, "get", no_data)
    monkeypatch.setattr(SafetensorsReader, "read_into", no_data)
    inputs = open_inputs([str(models.sdxl_a), str(models.sdxl_b)])
    try:
        plan = plan_merge(Recipe("weighted_sum", (str(models.sdxl_a), str(models.sdxl_b)), weights="GRAD_V"), inputs)
    finally:
        for r in inputs:
            r.close()
    assert plan.info.arch.name == "sdxl"
    by_key = {j.key: j for j in plan.jobs}
    assert by_key[CONV_IN].block == "IN00" and by_key[CONV_IN].identity is False
    # GRAD_V has BASE = 0: those keys are A as they are, and B is not even read for them
    te = next(j for j in plan.jobs if j.key.startswith("conditioner."))
    assert te.block == "BASE" and te.identity and te.sources == (0,)
    assert math.isclose(plan.block_values["alpha"]["OUT08"], 1.0)


def test_merge_leaves_torch_thread_count_of_later_threads_alone(tmp_path, models):
    """The workers run torch single-threaded; torch makes the last count the default of threads
    created later, so a merge inside a WebUI must put the host's count back afterwards."""
    import threading

    import torch

    from lib_merge.engine import merge
    from lib_merge.recipe import Recipe

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(Recipe("weighted_sum", (str(models.sd1_a), str(models.sd1_b))),
              tmp_path / "t.safetensors", threads=2, hash_inputs=False, hash_output=False)
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 2
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


# ---- kill -9 while write-back runs -----------------------------------------------------------------

_KILL_SCRIPT = """
import os, signal, sys
import lib_merge.engine.run as run
from lib_merge.recipe import Recipe
where, a, b, out = sys.argv[1:]
if where == "merging":  # some keys handed to write-back, the rest not yet merged
    produce, seen = run.produce_job, [0]
    def dying(plan, job, counters=None):
        seen[0] += 1
        if seen[0] == 30:
            os.kill(os.getpid(), signal.SIGKILL)
        yield from produce(plan, job, counters)
    run.produce_job = dying
else:  # every byte written, fsync'd, hashed and verified: killed on the way to the rename
    os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
run.merge(Recipe("weighted_sum", (a, b), alpha=0.3), out, hash_inputs=False, threads=2)
"""


@pytest.mark.parametrize("where", ["merging", "before_rename"])
def test_kill_9_with_write_back_leaves_nothing_under_the_final_name(models, out_dir, where):
    import subprocess
    import sys

    a, b = models.sd1_a, models.sd1_b
    out = out_dir / "killed.safetensors"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, where, str(a), str(b), str(out)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert leftovers(out_dir, out.name) == [out_dir / "killed.safetensors.tmp"]
    # a plain re-run needs no --overwrite and writes the same file as an uninterrupted merge
    result, _ = run_merge([a, b], out, alpha=0.3, durable=True)
    reference, _ = run_merge([a, b], out_dir / "reference.safetensors", alpha=0.3, durable=True)
    assert leftovers(out_dir, out.name) == [out]
    assert out.read_bytes() == reference.path.read_bytes()
    assert result.sha256 == reference.sha256 == sha256(out)
