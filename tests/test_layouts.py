"""Generated checkpoint layouts: exact against the released SD1.x/SDXL key lists and an independently
assembled SD2.x list (tests/data), self-consistent for shrunk demo widths."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lib_merge.arch import SD1, SD2, SDXL, detect_architecture, full_layout, unet_layout
from lib_merge.errors import BadParameterError

DATA = Path(__file__).resolve().parent / "data"


def _reference(name: str) -> dict:
    """tests/data/NAME.json as {"num_keys", "num_params", "keys": {key: {"shape", "int"?}}}."""
    raw = json.loads((DATA / f"{name}.json").read_text())
    ints = set(raw["int_keys"])
    keys = {k: ({"shape": s, "int": True} if k in ints else {"shape": s}) for k, s in raw["shapes"].items()}
    return {"num_keys": raw["num_keys"], "num_params": raw["num_params"], "keys": keys}


UNET = "model.diffusion_model."
# Dimensions that are not widths: kernels, image/latent channels, token count.
FIXED_DIMS = {1, 3, 4, 8, 9, 77}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_full_layout_matches_reference_exactly(name: str) -> None:
    ref = _reference(name)
    layout = full_layout(name)
    assert set(layout) == set(ref["keys"])
    assert len(layout) == ref["num_keys"]
    for key, entry in ref["keys"].items():
        shape, kind = layout[key]
        assert shape == tuple(entry["shape"]), key
        assert kind == ("int" if entry.get("int") else "float"), key
    assert sum(math.prod(s) for s, _ in layout.values()) == ref["num_params"]


@pytest.mark.parametrize("arch", [SD1, SD2, SDXL])
def test_unet_layout_is_the_unet_part(arch) -> None:
    full = full_layout(arch)
    unet = unet_layout(arch)
    assert unet == {k: v for k, v in full.items() if k.startswith(UNET)}
    assert all(k.startswith(UNET) for k in unet)


def test_sd2_layout() -> None:
    sd2 = full_layout(SD2)
    sd1 = full_layout(SD1)
    te = "cond_stage_model.model."
    assert sd2[te + "positional_embedding"] == ((77, 1024), "float")
    assert sd2[te + "token_embedding.weight"] == ((49408, 1024), "float")
    assert sd2[te + "text_projection"] == ((1024, 1024), "float")
    assert sd2[te + "logit_scale"] == ((), "float")
    assert sd2[te + "ln_final.weight"] == ((1024,), "float")
    pattern = re.compile(re.escape(te) + r"transformer\.resblocks\.(\d+)\.")
    resblocks = {int(m.group(1)) for m in map(pattern.match, sd2) if m}
    assert resblocks == set(range(24))
    assert sd2[te + "transformer.resblocks.23.attn.in_proj_weight"] == ((3072, 1024), "float")
    assert sd2[te + "transformer.resblocks.0.mlp.c_fc.weight"] == ((4096, 1024), "float")
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)

    # Same VAE as SD1; same U-Net keys, differing only in linear proj_in/out and context 1024.
    vae = "first_stage_model."
    assert {k: v for k, v in sd2.items() if k.startswith(vae)} == {
        k: v for k, v in sd1.items() if k.startswith(vae)
    }
    unet2 = {k: v for k, v in sd2.items() if k.startswith(UNET)}
    unet1 = {k: v for k, v in sd1.items() if k.startswith(UNET)}
    assert set(unet2) == set(unet1)
    for key, (shape, kind) in unet2.items():
        shape1 = unet1[key][0]
        if re.search(r"\.proj_(in|out)\.weight$", key):
            assert shape == shape1[:2] and len(shape1) == 4, key
        elif re.search(r"\.attn2\.to_[kv]\.weight$", key):
            assert shape == (shape1[0], 1024) and shape1[1] == 768, key
        else:
            assert shape == shape1, key
    assert detect_architecture({k: s for k, (s, _) in sd2.items()}).arch is SD2


def _check_transformer_consistency(layout: dict, context: int) -> None:
    """Inside every attention block the widths must agree with each other and the context."""
    shapes = {k: s for k, (s, _) in layout.items()}
    for key, shape in shapes.items():
        m = re.match(r"(.*\.transformer_blocks\.\d+)\.attn2\.to_k\.weight$", key)
        if not m:
            continue
        block = m.group(1)
        c = shape[0]
        assert shape == (c, context), key
        assert shapes[block + ".attn1.to_q.weight"] == (c, c)
        assert shapes[block + ".ff.net.0.proj.weight"] == (8 * c, c)
        assert shapes[block + ".ff.net.2.weight"] == (c, 4 * c)
        assert shapes[block + ".norm3.weight"] == (c,)


@pytest.mark.parametrize("divisor", [1, 8, 16])
def test_context_matches_text_width(divisor: int) -> None:
    sd1 = full_layout(SD1, width_divisor=divisor)
    _check_transformer_consistency(
        sd1, sd1["cond_stage_model.transformer.text_model.final_layer_norm.weight"][0][0]
    )
    sd2 = full_layout(SD2, width_divisor=divisor)
    _check_transformer_consistency(sd2, sd2["cond_stage_model.model.ln_final.weight"][0][0])
    xl = full_layout(SDXL, width_divisor=divisor)
    clip_l = xl["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"][0][0]
    clip_g = xl["conditioner.embedders.1.model.ln_final.weight"][0][0]
    _check_transformer_consistency(xl, clip_l + clip_g)
    # label_emb takes the pooled bigG projection plus the size embeddings.
    pooled = xl["conditioner.embedders.1.model.text_projection"][0][1]
    assert xl[UNET + "label_emb.0.0.weight"][0][1] == pooled + 1536 // divisor


@pytest.mark.parametrize("divisor", [8, 16, 64])
@pytest.mark.parametrize("arch", [SD1, SD2, SDXL])
def test_shrunk_layout_is_the_full_layout_scaled(arch, divisor: int) -> None:
    full = full_layout(arch)
    small = full_layout(arch, width_divisor=divisor)
    assert list(small) == list(full)
    for key, (shape, kind) in full.items():
        expected = tuple(d if d in FIXED_DIMS else d // divisor for d in shape)
        assert all(d in FIXED_DIMS or d % 64 == 0 for d in shape), key
        assert small[key] == (expected, kind), key
    info = detect_architecture({k: s for k, (s, _) in small.items()}, source=f"demo-{divisor}")
    assert info.arch is arch
    n_small = sum(math.prod(s) for s, _ in small.values())
    assert n_small < sum(math.prod(s) for s, _ in full.values()) / divisor


def test_inpainting_layout() -> None:
    layout = full_layout(SD1, width_divisor=16, inpainting=True)
    assert layout[UNET + "input_blocks.0.0.weight"] == ((20, 9, 3, 3), "float")
    assert layout[UNET + "out.2.weight"][0][0] == 4
    assert unet_layout(SD2, inpainting=True)[UNET + "input_blocks.0.0.weight"][0] == (320, 9, 3, 3)
    info = detect_architecture({k: s for k, (s, _) in layout.items()})
    assert info.inpainting and info.unet_in_channels == 9


@pytest.mark.parametrize("bad", [0, -8, 3, 128, True, 2.0])
def test_bad_width_divisor(bad) -> None:
    with pytest.raises(BadParameterError, match="width_divisor"):
        full_layout(SD1, width_divisor=bad)


def test_layout_by_name_or_spec() -> None:
    assert full_layout("sdxl", width_divisor=16) == full_layout(SDXL, width_divisor=16)
    assert full_layout("SD1.x", width_divisor=16) == full_layout(SD1, width_divisor=16)
