"""`merge … --lora`: the engine bakes after the method (fp32, one rounding), the recipe re-runs
byte-identically; fp8 output; prediction-type safety."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lib_merge.cli import main
from lib_merge.io.reader import open_checkpoint
from lib_merge.lora.synthetic import synthetic_lora
from tests.files import load_tensors, read_metadata

U = "model.diffusion_model."


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full"])
def test_merge_then_bake_equals_formula(models, out_dir, kind):
    with open_checkpoint(models.sd1_a) as r:
        shapes = r.shapes()
    lora = synthetic_lora(shapes, "sd1", kind=kind, rank=3, seed=7, tucker=kind == "loha")
    save_file(lora, str(models.dir / "l.safetensors"))
    out = out_dir / "m.safetensors"
    assert main(["merge", str(models.sd1_a), str(models.sd1_b), "--method", "weighted_sum", "--alpha", "0.5",
                 "--lora", f"{models.dir / 'l.safetensors'}:0.6", "--dtype", "fp32", "-o", str(out)]) == 0
    got, a, b = load_tensors(out), load_tensors(models.sd1_a), load_tensors(models.sd1_b)
    key = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    merged = torch.lerp(a[key].float(), b[key].float(), 0.5)
    p = {k.split(".", 1)[1]: v.float() for k, v in lora.items() if k.startswith(name + ".")}
    if kind == "lora":
        delta = p["lora_up.weight"] @ p["lora_down.weight"] * (float(p["alpha"]) / 3)
    elif kind == "loha":
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (float(p["alpha"]) / 3)
    elif kind == "lokr":
        delta = torch.kron(p["lokr_w1"], p["lokr_w2_a"] @ p["lokr_w2_b"]) * (float(p["alpha"]) / 3)
    else:
        delta = p["diff"]
        bias = U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.bias"
        diff_b = lora["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.diff_b"]
        torch.testing.assert_close(got[bias], torch.lerp(a[bias].float(), b[bias].float(), 0.5) + 0.6 * diff_b)
    torch.testing.assert_close(got[key], merged + 0.6 * delta, rtol=1e-6, atol=1e-7)
    untouched = U + "input_blocks.1.0.in_layers.0.weight"  # a norm: no LoRA type here trains it
    torch.testing.assert_close(got[untouched], torch.lerp(a[untouched].float(), b[untouched].float(), 0.5))


def test_single_model_bake_recipe_and_rerun(models, out_dir):
    with open_checkpoint(models.sdxl_a) as r:
        save_file(synthetic_lora(r.shapes(), "sdxl", rank=2, seed=1), str(models.dir / "xl.safetensors"))
    out = out_dir / "baked.safetensors"
    assert main(["merge", str(models.sdxl_a), "--lora", f"{models.dir / 'xl.safetensors'}:0.7", "--lora-weights", "M00=0",
                 "-o", str(out)]) == 0
    recipe = json.loads(read_metadata(out)["lib_merge_recipe"])
    assert recipe["loras"][0]["strength"] == 0.7 and recipe["loras"][0]["weights"] == "M00=0"
    assert len(recipe["loras"][0]["sha256"]) == 64 and recipe["models"] == ["../models/sdxl_a.safetensors"]
    got, a = load_tensors(out), load_tensors(models.sdxl_a)
    mid = U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(got[mid], a[mid])  # M00 at 0
    assert not torch.equal(got[U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"],
                           a[U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"])
    again = out_dir / "again.safetensors"
    assert main(["merge", "--recipe", str(out), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_bad_lora_is_one_error_and_no_output(models, out_dir, capsys):
    (models.dir / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    out = out_dir / "x.safetensors"
    assert main(["merge", str(models.sd1_a), "--lora", str(models.dir / "cut.safetensors"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cut.safetensors" in err[0]
    assert not list(out_dir.iterdir())


def test_output_never_replaces_a_lora_or_the_vae(models, out_dir, capsys):
    """The output may not be any file the recipe reads, --overwrite or not: a LoRA, the VAE."""
    with open_checkpoint(models.sd1_a) as r:
        save_file(synthetic_lora(r.shapes(), "sd1", rank=2, seed=3), str(out_dir / "l.safetensors"))
    lora = out_dir / "l.safetensors"
    vae = out_dir / "vae.safetensors"
    vae.write_bytes(models.sd1_b.read_bytes())
    before = {lora: lora.read_bytes(), vae: vae.read_bytes()}
    for target, extra in ((lora, []), (vae, ["--vae", str(vae)])):
        code = main(["merge", str(models.sd1_a), str(models.sd1_b), "--lora", f"{lora}:0.5", *extra,
                     "-o", str(target), "--overwrite", "--no-hash"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert "input of the merge" in err[0] and target.name in err[0]
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["l.safetensors", "vae.safetensors"]


def test_fp8_output_unet_only_saturated_within_one_ulp(models, out_dir):
    big = models.derive(models.sd1_a, "big.safetensors",
                        replace={U + "out.2.bias": torch.tensor([500.0, -1e4, 1.0, 0.3], dtype=torch.float16)})
    out = out_dir / "f8.safetensors"
    assert main(["merge", str(big), str(big), "--alpha", "0.5", "--dtype", "fp8_e4m3fn", "-o", str(out)]) == 0
    got, a = load_tensors(out), load_tensors(big)
    assert got[U + "out.2.bias"].dtype == torch.float8_e4m3fn
    assert got[U + "out.2.bias"].float().tolist()[:2] == [448.0, -448.0]  # saturated, not NaN
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert got[te].dtype == torch.float16 and torch.equal(got[te], a[te])
    key = U + "input_blocks.1.0.in_layers.2.weight"
    x, y = a[key].float(), got[key].float()
    # one e4m3 ulp: 2^(e−3) for normals, 2^−9 below 2^−6
    ulp = torch.where(x.abs() < 2 ** -6, torch.full_like(x, 2 ** -9), 2.0 ** (torch.floor(torch.log2(x.abs())) - 3))
    assert bool(((y - x).abs() <= ulp / 2 + 1e-12).all())


def test_mixed_prediction_refused_then_allowed(models, out_dir, capsys):
    v = models.derive(models.sd1_b, "v.safetensors", add={"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    out = out_dir / "mix.safetensors"
    assert main(["merge", str(models.sd1_a), str(v), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "eps" in err and "v+ztsnr" in err and "--allow-mixed-prediction" in err and not out.exists()
    assert main(["merge", str(models.sd1_a), str(v), "--allow-mixed-prediction", "B", "-o", str(out)]) == 0
    got = load_tensors(out)
    assert "v_pred" in got and "ztsnr" in got
    meta = read_metadata(out)
    assert meta["modelspec.prediction_type"] == "v" and json.loads(meta["lib_merge_recipe"])["prediction"] == "B"
    assert main(["merge", str(models.sd1_a), str(v), "--allow-mixed-prediction", "-o", str(out_dir / "a.safetensors")]) == 0
    assert "v_pred" not in load_tensors(out_dir / "a.safetensors")
    assert read_metadata(out_dir / "a.safetensors")["modelspec.prediction_type"] == "epsilon"


def test_inspect_shows_prediction_type(models, capsys):
    v = models.derive(models.sd1_b, "v.safetensors", add={"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    assert main(["inspect", str(v)]) == 0
    assert "prediction: v+ztsnr" in capsys.readouterr().out
    assert main(["inspect", str(models.sd1_a)]) == 0
    assert "prediction: eps" in capsys.readouterr().out
