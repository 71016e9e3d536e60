"""Live merge into a U-Net on a CUDA device, as on a user's GPU: patches equal the streaming
engine's file, a slider touches only its block, restore is bit-exact, and A's originals stay on
the CPU. Skipped where no CUDA device is present (CI is CPU-only); run on a GPU machine."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.arch import block_of
from lib_merge.engine import merge
from lib_merge.live import LiveMerge, LiveTarget
from lib_merge.recipe import Recipe
from lib_merge.webui.board.host_a1111 import A1111Target

from tests.hosts.common.checkpoints import PREFIX, loaded_unet, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("live_cuda")
    return {flavour: [write_checkpoint(root / f"{flavour}_{i}.safetensors", flavour, seed=i) for i in range(2)]
            for flavour in ("sd1", "sdxl")}


def _targets(unet):
    return {
        "plain": LiveTarget({PREFIX: unet}),
        "a1111": A1111Target(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))),
    }


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
@pytest.mark.parametrize("target_kind", ["plain", "a1111"])
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.float32])
def test_cuda_patch_equals_file_then_restores(files, tmp_path, flavour, target_kind, model_dtype):
    a, b = files[flavour]
    unet = loaded_unet(a, flavour, model_dtype).cuda()
    original = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in unet.state_dict(keep_vars=True).items()}
    live = LiveMerge(_targets(unet)[target_kind], a)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.4, weights="GRAD_V,IN04=0.9", dtype="fp16")
    assert live.apply(recipe).keys > 0
    saved = load_file(str(merge(recipe, tmp_path / "out.safetensors", hash_inputs=False, hash_output=False,
                                durable=False).path))
    mismatched = [k for k, v in unet.state_dict().items()
                  if not _same_bits(v, saved[PREFIX + k].to(model_dtype))]
    assert mismatched == []
    assert all(v.device.type == "cpu" for v in live.originals.kept.values() if v is not None)

    before = {k: (v._version, v.detach().clone()) for k, v in unet.state_dict(keep_vars=True).items()}
    report = live.apply(recipe.replace(weights="GRAD_V,IN04=0.2"))
    assert report.blocks == ["IN04"]
    arch = "sd1" if flavour == "sd1" else "sdxl"
    for name, tensor in unet.state_dict(keep_vars=True).items():
        if block_of(arch, PREFIX + name) != "IN04":
            assert tensor._version == before[name][0], name
            assert torch.equal(tensor.detach(), before[name][1]), name

    rng = random.Random(5)
    for _ in range(50):
        live.apply(recipe.replace(weights=",".join(str(rng.choice([0, 0.3, 1])) for _ in range(26 if arch == "sd1" else 20))))
    live.restore()
    for name, tensor in unet.state_dict(keep_vars=True).items():
        assert tensor.device.type == "cuda" and tensor.data_ptr() == pointers[name], name
        assert _same_bits(tensor, original[name]), name
    live.close()
