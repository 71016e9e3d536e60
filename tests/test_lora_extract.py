"""LoRA extraction: full rank reproduces B on every extracted layer, rank r keeps exactly the top-r
singular values (checked against torch.linalg.svd), seeded randomized SVD, kohya layout and the
metadata A1111 / Forge read."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from lib_merge.arch import SD1, SDXL
from lib_merge.errors import ArchitectureMismatchError
from lib_merge.io.reader import open_checkpoint
from lib_merge.lora.bake import apply_patches
from lib_merge.lora.extract import ExtractOptions, extract_lora
from lib_merge.lora.formats import LoraFile
from lib_merge.lora.patches import LoraSpec, bind
from lib_merge.lora.svd import factorize
from tests.files import load_tensors, read_metadata


def _bake_all(ckpt, lora_path, arch):
    lora = LoraFile(lora_path)
    with open_checkpoint(ckpt) as reader:
        binding = bind([(lora, LoraSpec(str(lora_path)))], reader.shapes(), arch, "supermerger")
        assert not binding.warnings
        return {key: apply_patches(reader.get(key).float().clone(), p) for key, p in binding.patches.items()}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_full_rank_extract_then_bake_reproduces_b(models, out_dir, arch):
    a, b = (models.sd1_a, models.sd1_b) if arch == "sd1" else (models.sdxl_a, models.sdxl_b)
    out = out_dir / "full.safetensors"
    extract_lora(a, b, out, ExtractOptions(rank=100000, conv_rank=100000, text_encoders=True))
    baked = _bake_all(a, out, SD1 if arch == "sd1" else SDXL)
    want = load_tensors(b)
    assert len(baked) > 150
    for key, w in baked.items():
        # B is fp16, the factors are fp16: within a few fp16 ulps of B's values
        torch.testing.assert_close(w, want[key].float(), rtol=4e-3, atol=2e-4, msg=key)
    te2 = [k for k in baked if "in_proj_weight" in k]
    assert te2 or arch == "sd1"


def test_rank_r_keeps_top_singular_values(models, out_dir):
    out = out_dir / "r4.safetensors"
    report = extract_lora(models.sd1_a, models.sd1_b, out, ExtractOptions(rank=4, dtype="fp32"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    lora = load_tensors(out)
    delta = load_tensors(models.sd1_b)[key].float() - load_tensors(models.sd1_a)[key].float()
    s = torch.linalg.svd(delta).S
    got = torch.linalg.svdvals(lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"])
    torch.testing.assert_close(got[:4], s[:4], rtol=1e-4, atol=1e-7)
    assert lora[f"{name}.lora_down.weight"].shape[0] == 4 and float(lora[f"{name}.alpha"]) == 4
    assert all(r == 4 for r in report.ranks)
    for block, (kept, total) in report.energy.items():
        assert 0 < kept <= total * (1 + 1e-9)


def test_conv_layout_and_energy_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 6, 3, 3, generator=g)
    f = factorize(delta, 4)
    assert f.up.shape == (8, 4, 1, 1) and f.down.shape == (4, 6, 3, 3)
    exact = (torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g))
    f = factorize(exact, 3)
    torch.testing.assert_close(f.up @ f.down, exact, rtol=1e-5, atol=1e-5)
    s = torch.linalg.svdvals(exact)
    k = factorize(exact, 10, energy=0.95).rank
    frac = torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum())
    assert frac[k - 1] >= 0.95 and (k == 1 or frac[k - 2] < 0.95)


def test_randomized_svd_seeded_and_near_optimal():
    g = torch.Generator().manual_seed(1)
    n = 200
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -0.3  # a flat spectrum: the hard case
    m = (u * s) @ v.T
    exact = factorize(m, 32)
    ran1 = factorize(m, 32, randomized=True, generator=torch.Generator().manual_seed(5))
    ran2 = factorize(m, 32, randomized=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ran1.up, ran2.up) and torch.equal(ran1.down, ran2.down)
    err_opt = torch.linalg.norm(m - exact.up @ exact.down)
    err = torch.linalg.norm(m - ran1.up @ ran1.down)
    assert err <= 1.02 * err_opt
    # the reported retained energy is the true error
    assert abs((ran1.total - ran1.kept) - float(err) ** 2) < 1e-3 * ran1.total


def test_metadata_for_a1111_and_forge(models, out_dir):
    out = out_dir / "meta.safetensors"
    extract_lora(models.sdxl_a, models.sdxl_b, out, ExtractOptions(rank=8, conv_rank=4))
    meta = read_metadata(out)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    # A1111 detect_version: sdxl_ prefix; Forge: modelspec.architecture
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    data = out.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest()
    with safe_open(str(out), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
    assert all(n.startswith("lora_unet_") for n in names)  # no --text-encoders
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names  # SDXL: ldm names


def test_extract_refuses_mixed_architectures(models, out_dir):
    with pytest.raises(ArchitectureMismatchError, match="SDXL"):
        extract_lora(models.sd1_a, models.sdxl_a, out_dir / "x.safetensors", ExtractOptions(rank=4))
    assert not list(out_dir.iterdir())
