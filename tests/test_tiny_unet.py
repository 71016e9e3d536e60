import json
from pathlib import Path

import pytest
import torch

from lib_merge.testing import (
    EpsDenoiser,
    UNetModel,
    make_tiny_unet,
    random_conditioning,
    sd1_config,
    sd_discrete_sigmas,
    sdxl_config,
)

DATA = Path(__file__).resolve().parent / "data"
PREFIX = "model.diffusion_model."


def _spec(name):
    shapes = json.loads((DATA / f"{name}.json").read_text())["shapes"]
    return {k: tuple(v) for k, v in shapes.items() if k.startswith(PREFIX)}


@pytest.mark.parametrize("name, config", [("sd1", sd1_config()), ("sdxl", sdxl_config())])
def test_full_size_state_dict_matches_real_checkpoint_layout(name, config):
    expected = _spec(name)
    with torch.device("meta"):
        model = UNetModel(config)
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
@pytest.mark.parametrize("hw", [(16, 16), (24, 16), (20, 12)])
def test_tiny_forward_shapes_any_aspect(flavour, hw):
    model = make_tiny_unet(flavour)
    cond = random_conditioning(model.config, 2)
    x = torch.randn(2, 4, *hw)
    context = cond["crossattn"] if isinstance(cond, dict) else cond
    y = cond["vector"] if isinstance(cond, dict) else None
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 900.0]), context, y=y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_unet_has_ldm_module_names():
    model = make_tiny_unet("sdxl")
    names = dict(model.named_modules())
    for name in (
        "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.1.0.in_layers.2",
        "input_blocks.1.0.emb_layers.1", "input_blocks.1.0.out_layers.3", "input_blocks.2.0.op",
        "middle_block.1.proj_in", "middle_block.1.transformer_blocks.1.attn1.to_out.0",
        "middle_block.1.transformer_blocks.0.ff.net.0.proj", "middle_block.1.transformer_blocks.0.ff.net.2",
        "output_blocks.1.2.conv", "out.0", "out.2",
    ):
        assert name in names, name
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 128 // 16


def test_same_seed_same_weights():
    a, b = make_tiny_unet("sd1", seed=3), make_tiny_unet("sd1", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_eps_denoiser_maps_sigma_to_timestep_and_returns_x0():
    denoiser = EpsDenoiser(make_tiny_unet("sd1"))
    table = sd_discrete_sigmas()
    t = denoiser.sigma_to_t(table[[0, 10, 999]])
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 999.0]), atol=1e-3)
    x = torch.randn(1, 4, 16, 16)
    cond = random_conditioning(denoiser.unet.config, 1)
    with torch.no_grad():
        d = denoiser(x, torch.tensor([1e-4]), cond=cond)
    # At a negligible noise level the x0 prediction is the input itself.
    assert torch.allclose(d, x, atol=1e-2)
