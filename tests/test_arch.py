"""Architecture detection and key classification, checked against the full SD1.x / SDXL key lists
in tests/data and against the layouts the library generates itself."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lib_merge.arch import (
    ARCHITECTURES,
    BLOCK_POLICIES,
    DEFAULT_POLICY,
    SD1,
    SD2,
    SDXL,
    ArchSpec,
    block_of,
    component_of,
    detect_architecture,
    full_layout,
    get_arch,
    kept_from_a,
    key_kind,
    keys_by_block,
    unet_layout,
)
from lib_merge.errors import (
    ArchitectureMismatchError,
    BadBlockWeightsError,
    UnknownArchitectureError,
)

DATA = Path(__file__).resolve().parent / "data"


def _reference(name: str) -> dict:
    """tests/data/NAME.json as {"num_keys", "num_params", "keys": {key: {"shape", "int"?}}}."""
    raw = json.loads((DATA / f"{name}.json").read_text())
    ints = set(raw["int_keys"])
    keys = {k: ({"shape": s, "int": True} if k in ints else {"shape": s}) for k, s in raw["shapes"].items()}
    return {"num_keys": raw["num_keys"], "num_params": raw["num_params"], "keys": keys}
UNET = "model.diffusion_model."


def _load_spec(name: str) -> dict:
    return _reference(name)["keys"]


@pytest.fixture(scope="module")
def sd1_keys() -> dict:
    return _load_spec("sd1")


@pytest.fixture(scope="module")
def sdxl_keys() -> dict:
    return _load_spec("sdxl")


def _shapes(spec_keys: dict) -> dict:
    return {k: tuple(v["shape"]) for k, v in spec_keys.items()}


def _layout_shapes(layout: dict) -> dict:
    return {k: shape for k, (shape, _) in layout.items()}


# ---- specs ---------------------------------------------------------------------------------------


def test_arch_specs_block_lists() -> None:
    assert len(SD1.blocks) == len(SD2.blocks) == 26
    assert len(SDXL.blocks) == 20
    assert SD1.blocks[:3] == ("BASE", "IN00", "IN01")
    assert SD1.blocks[12:15] == ("IN11", "M00", "OUT00")
    assert SD1.blocks[-1] == "OUT11"
    assert SDXL.blocks[9:12] == ("IN08", "M00", "OUT00")
    assert SDXL.blocks[-1] == "OUT08"
    assert (SD1.n_input_blocks, SD1.n_output_blocks) == (12, 12)
    assert (SDXL.n_input_blocks, SDXL.n_output_blocks) == (9, 9)
    assert [a.label for a in ARCHITECTURES.values()] == ["SD1.x", "SD2.x", "SDXL"]
    assert get_arch("sdxl") is SDXL and get_arch("SD1.x") is SD1 and get_arch(SD2) is SD2
    with pytest.raises(UnknownArchitectureError, match="sd1.*sd2.*sdxl"):
        get_arch("flux")


# ---- detection -----------------------------------------------------------------------------------


def test_detect_sd1_full(sd1_keys: dict) -> None:
    info = detect_architecture(_shapes(sd1_keys), source="sd15.safetensors")
    assert info.arch is SD1
    assert (info.inpainting, info.v_prediction, info.ztsnr) == (False, None, False)
    assert info.unet_in_channels == 4
    assert info.has_text_encoder and info.has_vae


def test_detect_sdxl_full(sdxl_keys: dict) -> None:
    info = detect_architecture(_shapes(sdxl_keys))
    assert info.arch is SDXL
    assert not info.inpainting and info.has_text_encoder and info.has_vae


def test_detect_sd2_from_derived_layout() -> None:
    info = detect_architecture(_layout_shapes(full_layout("sd2")))
    assert info.arch is SD2
    assert info.has_text_encoder and info.has_vae


def test_detect_inpainting(sd1_keys: dict) -> None:
    shapes = _shapes(sd1_keys)
    shapes[UNET + "input_blocks.0.0.weight"] = (320, 9, 3, 3)
    info = detect_architecture(shapes)
    assert info.arch is SD1 and info.inpainting and info.unet_in_channels == 9
    xl = detect_architecture(_layout_shapes(full_layout(SDXL, width_divisor=16, inpainting=True)))
    assert xl.arch is SDXL and xl.inpainting


def test_other_input_widths_are_not_inpainting(sd1_keys: dict) -> None:
    shapes = _shapes(sd1_keys)
    shapes[UNET + "input_blocks.0.0.weight"] = (320, 8, 3, 3)
    info = detect_architecture(shapes)
    assert not info.inpainting and info.unet_in_channels == 8
    assert any("8 channels" in n for n in info.notes)


def test_detect_v_prediction_from_marker_key(sdxl_keys: dict) -> None:
    shapes = _shapes(sdxl_keys)
    shapes["v_pred"] = ()
    shapes["ztsnr"] = ()
    info = detect_architecture(shapes)
    assert info.v_prediction is True and info.ztsnr is True
    assert "v-prediction" in info.summary() and "ZTSNR" in info.summary()


@pytest.mark.parametrize(
    "value, expected", [("v", True), ("v_prediction", True), ("epsilon", False), ("other", None)]
)
def test_detect_v_prediction_from_metadata(value: str, expected: object) -> None:
    shapes = _layout_shapes(full_layout("sd2", width_divisor=16))
    info = detect_architecture(shapes, {"modelspec.prediction_type": value})
    assert info.v_prediction is expected


def test_no_metadata_means_unknown_prediction() -> None:
    shapes = _layout_shapes(full_layout("sd2", width_divisor=16))
    assert detect_architecture(shapes, {}).v_prediction is None
    assert detect_architecture(shapes, None).v_prediction is None


def test_detect_edm_vpred_keys() -> None:
    shapes = _layout_shapes(full_layout("sdxl", width_divisor=16))
    shapes["edm_vpred.sigma_max"] = ()
    shapes["edm_vpred.sigma_min"] = ()
    assert detect_architecture(shapes).v_prediction is True


def test_detect_unet_only(sd1_keys: dict, sdxl_keys: dict) -> None:
    for keys, arch in ((sd1_keys, SD1), (sdxl_keys, SDXL)):
        shapes = {k: v for k, v in _shapes(keys).items() if k.startswith(UNET)}
        info = detect_architecture(shapes)
        assert info.arch is arch
        assert not info.has_text_encoder and not info.has_vae
        assert "U-Net only" in info.summary()
    assert detect_architecture(_layout_shapes(unet_layout("sd2"))).arch is SD2


@pytest.mark.parametrize("divisor", [8, 16, 64])
@pytest.mark.parametrize("arch", [SD1, SD2, SDXL])
def test_detect_shrunk_widths(arch: ArchSpec, divisor: int) -> None:
    full = detect_architecture(_layout_shapes(full_layout(arch, width_divisor=divisor)))
    assert full.arch is arch and full.has_text_encoder and full.has_vae
    unet = detect_architecture(_layout_shapes(unet_layout(arch, divisor)))
    assert unet.arch is arch


@pytest.mark.parametrize("arch, context", [(SD1, 768), (SD2, 1024)])
def test_context_width_is_the_fallback(arch: ArchSpec, context: int) -> None:
    # Without proj_in/proj_out the SD1/SD2 structure is ambiguous; the context width decides.
    shapes = {
        k: s
        for k, s in _layout_shapes(unet_layout(arch)).items()
        if ".proj_in." not in k and ".proj_out." not in k
    }
    to_k = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert shapes[to_k] == (320, context)
    assert detect_architecture(shapes).arch is arch


def test_structure_beats_context_width() -> None:
    # A shrunk SD2 U-Net has context 64, matching no real family; linear proj_in still says SD2.
    shapes = _layout_shapes(unet_layout(SD2, 16))
    assert shapes[UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (80, 64)
    assert detect_architecture(shapes).arch is SD2


def test_unknown_layout_error_names_source_and_markers() -> None:
    with pytest.raises(UnknownArchitectureError) as err:
        detect_architecture({"encoder.conv_in.weight": (128, 3, 3, 3)}, source="vae.safetensors")
    message = str(err.value)
    assert "vae.safetensors" in message
    assert "conditioner.embedders.1.model.transformer.resblocks." in message
    assert "cond_stage_model.transformer.text_model." in message
    assert "model.diffusion_model.label_emb.0.0.weight" in message
    assert "model.diffusion_model.input_blocks.0.0.weight" in message
    assert "standalone VAE" in message


def test_unknown_error_hints() -> None:
    with pytest.raises(UnknownArchitectureError, match="lora.safetensors.*LoRA"):
        detect_architecture(
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
            source="lora.safetensors",
        )
    with pytest.raises(UnknownArchitectureError, match="no tensors"):
        detect_architecture({}, source="empty.safetensors")
    with pytest.raises(UnknownArchitectureError, match="diffusers"):
        detect_architecture({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})


def test_unknown_unet_structure() -> None:
    shapes = {
        k: s
        for k, s in _layout_shapes(unet_layout(SD1, 16)).items()
        if ".proj_in." not in k and ".proj_out." not in k
    }  # no proj_in and a context width (48) that matches no family
    with pytest.raises(UnknownArchitectureError, match="model.safetensors"):
        detect_architecture(shapes, source="model.safetensors")


def test_sdxl_refiner_is_reported() -> None:
    # The refiner's U-Net has label_emb like SDXL base but 12 input blocks, and its only text
    # encoder (OpenCLIP bigG) sits at embedders.0.
    shapes = _layout_shapes(unet_layout(SD2, 16))
    shapes[UNET + "label_emb.0.0.weight"] = (80, 160)
    shapes["conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"] = (80,)
    with pytest.raises(UnknownArchitectureError, match="SDXL refiner is not supported"):
        detect_architecture(shapes, source="refiner.safetensors")
    unet_only = {k: s for k, s in shapes.items() if k.startswith(UNET)}
    with pytest.raises(UnknownArchitectureError, match="SDXL refiner is not supported"):
        detect_architecture(unet_only)


def test_mixed_architectures_raise_mismatch() -> None:
    xl_unet = _layout_shapes(unet_layout(SDXL, 16))
    sd1_text = {
        k: s
        for k, s in _layout_shapes(full_layout(SD1, width_divisor=16)).items()
        if k.startswith("cond_stage_model.")
    }
    with pytest.raises(ArchitectureMismatchError, match="mixed.safetensors.*SD1.x.*SDXL"):
        detect_architecture({**xl_unet, **sd1_text}, source="mixed.safetensors")


def test_ema_keys_are_noted(sd1_keys: dict) -> None:
    shapes = _shapes(sd1_keys)
    shapes["model_ema.diffusion_modelinput_blocks00weight"] = (320, 4, 3, 3)
    shapes["model_ema.decay"] = ()
    info = detect_architecture(shapes)
    assert info.arch is SD1
    assert any("1 EMA tensors" in n for n in info.notes)


# ---- key -> block --------------------------------------------------------------------------------


def _expected_block(key: str, arch: ArchSpec, policy: str) -> str:
    """The tables of the merge reference of the design notes §1, written out independently of lib_merge.arch.keys."""
    last_out = "OUT11" if arch.n_output_blocks == 12 else "OUT08"
    if key.startswith(("cond_stage_model.", "conditioner.", "first_stage_model.")):
        return "BASE"
    assert key.startswith(UNET), key
    m = re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.", key)
    if m:
        return "IN" + m.group(1).zfill(2)
    m = re.match(r"model\.diffusion_model\.output_blocks\.(\d+)\.", key)
    if m:
        return "OUT" + m.group(1).zfill(2)
    if key.startswith(UNET + "middle_block."):
        return "M00"
    if key.startswith(UNET + "out."):
        return last_out
    if key.startswith((UNET + "time_embed.", UNET + "label_emb.")):
        if policy == "supermerger-2023" and arch is not SDXL:
            return last_out  # supermerger's BLOCKID[-2 + 1] wrap
        return {"supermerger": "IN00", "bbc-mc": "IN00", "supermerger-2023": "IN00", "sd-mecha": "BASE"}[policy]
    raise AssertionError(f"unexpected key {key}")


POLICIES = ["supermerger", "supermerger-2023", "bbc-mc", "sd-mecha"]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_sd1_key_maps_to_its_block(sd1_keys: dict, policy: str) -> None:
    for key in sd1_keys:
        assert block_of(SD1, key, policy) == _expected_block(key, SD1, policy), key


@pytest.mark.parametrize("policy", POLICIES)
def test_every_sdxl_key_maps_to_its_block(sdxl_keys: dict, policy: str) -> None:
    for key in sdxl_keys:
        assert block_of(SDXL, key, policy) == _expected_block(key, SDXL, policy), key


@pytest.mark.parametrize("policy", POLICIES)
def test_every_sd2_key_maps_to_its_block(policy: str) -> None:
    sd2_keys = _load_spec("sd2")
    assert len(sd2_keys) == 1228
    for key in sd2_keys:
        assert block_of(SD2, key, policy) == _expected_block(key, SD2, policy), key


@pytest.mark.parametrize("arch, keys", [(SD1, "sd1"), (SD2, "sd2"), (SDXL, "sdxl")])
def test_only_supermerger_2023_keeps_sdxl_embeddings_from_a(arch: ArchSpec, keys: str) -> None:
    kept = {p: sorted(k for k in _load_spec(keys) if kept_from_a(arch, k, p)) for p in POLICIES}
    expected = [UNET + f"{m}.{i}.{t}" for m, i in (("label_emb", "0.0"), ("label_emb", "0.2"),
                                                   ("time_embed", "0"), ("time_embed", "2"))
                for t in ("bias", "weight")] if arch is SDXL else []
    assert kept == {"supermerger": [], "supermerger-2023": expected, "bbc-mc": [], "sd-mecha": []}


def test_block_counts_sd1(sd1_keys: dict) -> None:
    # Hand counts: ResBlock 10 keys (+2 with a skip conv), SpatialTransformer with one block 26,
    # down/upsample conv 2, CLIP-L 197, VAE 248.
    counts = Counter(block_of(SD1, k) for k in sd1_keys)
    assert counts["BASE"] == 197 + 248
    assert counts["IN00"] == 2 + 4  # conv_in + time_embed
    assert counts["IN01"] == 10 + 26
    assert counts["IN03"] == 2
    assert counts["IN04"] == 12 + 26
    assert counts["IN10"] == counts["IN11"] == 10
    assert counts["M00"] == 10 + 26 + 10
    assert counts["OUT00"] == 12
    assert counts["OUT02"] == 12 + 2
    assert counts["OUT05"] == 12 + 26 + 2
    assert counts["OUT11"] == 12 + 26 + 4  # + out.0 / out.2
    assert set(counts) == set(SD1.blocks)
    assert sum(counts.values()) == len(sd1_keys) == 1131
    mecha = Counter(block_of(SD1, k, "sd-mecha") for k in sd1_keys)
    assert mecha["BASE"] == counts["BASE"] + 4 and mecha["IN00"] == 2


def test_block_counts_sdxl(sdxl_keys: dict) -> None:
    # SDXL transformer blocks are 20 keys each plus 6 per SpatialTransformer; OpenCLIP bigG has
    # 6 + 32 x 12 keys.
    counts = Counter(block_of(SDXL, k) for k in sdxl_keys)
    assert counts["BASE"] == 197 + (6 + 32 * 12) + 248
    assert counts["IN00"] == 2 + 4 + 4  # conv_in + time_embed + label_emb
    assert counts["IN01"] == 10
    assert counts["IN04"] == 12 + 6 + 2 * 20
    assert counts["IN07"] == 12 + 6 + 10 * 20
    assert counts["M00"] == 10 + 6 + 10 * 20 + 10
    assert counts["OUT02"] == 12 + 6 + 10 * 20 + 2
    assert counts["OUT06"] == 12
    assert counts["OUT08"] == 12 + 4
    assert set(counts) == set(SDXL.blocks)
    assert sum(counts.values()) == len(sdxl_keys) == 2515
    mecha = Counter(block_of(SDXL, k, "sd-mecha") for k in sdxl_keys)
    assert mecha["BASE"] == counts["BASE"] + 8 and mecha["IN00"] == 2


def test_block_of_spot_checks() -> None:
    assert block_of(SD1, UNET + "out.2.weight") == "OUT11"
    assert block_of(SDXL, UNET + "out.2.weight") == "OUT08"
    assert block_of(SDXL, UNET + "out.0.bias", "sd-mecha") == "OUT08"
    assert block_of(SD1, UNET + "time_embed.0.weight") == "IN00"
    assert block_of(SD1, UNET + "time_embed.0.weight", "sd-mecha") == "BASE"
    assert block_of(SDXL, UNET + "label_emb.0.2.weight") == "IN00"
    assert block_of(SDXL, UNET + "label_emb.0.2.weight", "sd-mecha") == "BASE"
    assert block_of("sd1", UNET + "input_blocks.10.0.in_layers.0.weight") == "IN10"
    assert block_of(SD1, "first_stage_model.decoder.conv_out.weight") == "BASE"
    assert block_of(SD1, "some.exotic.extra_key") == "BASE"
    assert block_of(SD1, UNET + "something_new.weight") == "BASE"
    assert block_of(SD1, "alphas_cumprod") == "BASE"


def test_block_of_errors() -> None:
    with pytest.raises(BadBlockWeightsError, match="'comfy'.*bbc-mc.*sd-mecha.*supermerger.*supermerger-2023"):
        block_of(SD1, UNET + "out.2.weight", policy="comfy")
    with pytest.raises(ArchitectureMismatchError, match="input_blocks 11.*SDXL"):
        block_of(SDXL, UNET + "input_blocks.11.0.in_layers.0.weight")
    assert set(BLOCK_POLICIES) == {"supermerger", "supermerger-2023", "bbc-mc", "sd-mecha"}
    with pytest.raises(BadBlockWeightsError, match="'comfy'"):
        kept_from_a(SDXL, UNET + "label_emb.0.0.weight", policy="comfy")


def test_default_policy_is_current_supermerger() -> None:
    # supermerger 0b1c491 (2cbd062 onwards): with a 26/20-value vector time_embed and label_emb
    # take IN00's weight (see the lib_merge.arch.keys docstring).
    assert DEFAULT_POLICY == "supermerger"
    for arch, key in ((SD1, "time_embed.0.weight"), (SDXL, "time_embed.2.bias"), (SDXL, "label_emb.0.0.weight")):
        assert block_of(arch, UNET + key) == block_of(arch, UNET + key, "bbc-mc") == "IN00"
        assert not kept_from_a(arch, UNET + key)


def test_keys_by_block_groups_in_block_order(sdxl_keys: dict) -> None:
    groups = keys_by_block(SDXL, sdxl_keys)
    assert tuple(groups) == SDXL.blocks
    assert UNET + "out.2.weight" in groups["OUT08"]
    assert sum(len(v) for v in groups.values()) == len(sdxl_keys)


# ---- key kinds and components --------------------------------------------------------------------


def test_key_kind() -> None:
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert key_kind(pos, "I64") == "copy"
    assert key_kind(pos, "torch.int64") == "copy"
    assert key_kind("v_pred", "F32", ()) == "copy"
    assert key_kind("ztsnr", "F32") == "copy"
    assert key_kind("edm_vpred.sigma_max", "F32") == "copy"
    for buffer in (
        "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
        "posterior_variance", "posterior_mean_coef1", "sqrt_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "logvar", "lvlb_weights",
    ):
        assert key_kind(buffer, "F32") == "copy", buffer
    assert key_kind("model_ema.diffusion_modelinput_blocks00weight", "F32") == "drop"
    assert key_kind("model_ema.decay", "F32") == "copy"
    assert key_kind("model_ema.num_updates", "I32") == "copy"
    assert key_kind("conditioner.embedders.1.model.logit_scale", "F32") == "copy"
    weight = UNET + "input_blocks.0.0.weight"
    for dtype in ("F16", "F32", "BF16", "F8_E4M3", "F64"):
        assert key_kind(weight, dtype) == "merge", dtype
    assert key_kind(weight, "F16", (320, 4, 3, 3)) == "merge"
    assert key_kind(weight, "F16", ()) == "copy"
    assert key_kind(weight, "F16", (0, 4)) == "copy"
    assert key_kind("some.flag", "BOOL") == "copy"


def test_every_real_key_kind(sd1_keys: dict, sdxl_keys: dict) -> None:
    for keys in (sd1_keys, sdxl_keys):
        for key, entry in keys.items():
            dtype = "I64" if entry.get("int") else "F16"
            kind = key_kind(key, dtype, entry["shape"])
            expected = "copy" if key.endswith(("position_ids", "logit_scale")) else "merge"
            assert kind == expected, key


def test_component_of() -> None:
    assert component_of(UNET + "out.2.weight") == "unet"
    clip_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    assert component_of(clip_key) == "text_encoder"
    assert component_of("conditioner.embedders.1.model.ln_final.weight") == "text_encoder"
    assert component_of("first_stage_model.decoder.conv_out.weight") == "vae"
    assert component_of("alphas_cumprod") == "other"
    assert component_of("model_ema.decay") == "other"


# ---- policies in a real merge ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory) -> tuple:
    import torch

    from lib_merge.synthetic import write_synthetic_checkpoint

    folder = tmp_path_factory.mktemp("policy")
    a = write_synthetic_checkpoint(folder / "a.safetensors", "sdxl", width_divisor=32, model=0, dtype=torch.float32)
    b = write_synthetic_checkpoint(folder / "b.safetensors", "sdxl", width_divisor=32, model=1, dtype=torch.float32)
    return folder, a, b


def _merge_json(folder: Path, name: str, recipe_json: str) -> dict:
    from lib_merge.engine import merge
    from lib_merge.recipe import Recipe
    from tests.files import load_tensors

    out = folder / name
    merge(Recipe.from_json(recipe_json).with_base_dir(folder), out, overwrite=True)
    return {"bytes": out.read_bytes(), "tensors": load_tensors(out)}


def _recipe_json(blocks: str | None) -> str:
    data = {"version": 1, "method": "weighted_sum", "models": ["a.safetensors", "b.safetensors"],
            "alpha": 0.5, "weights": "GRAD_V", "params": {}, "seed": 0, "dtype": "fp32"}
    if blocks is not None:
        data["blocks"] = blocks
    return json.dumps(data)


def test_grad_v_on_sdxl_embeddings_per_policy(sdxl_pair: tuple) -> None:
    from tests.files import load_tensors

    folder, a_path, b_path = sdxl_pair
    a, b = load_tensors(a_path), load_tensors(b_path)
    embeddings = [k for k in a if k.startswith((UNET + "time_embed.", UNET + "label_emb."))]
    assert len(embeddings) == 8
    runs = {p: _merge_json(folder, f"{p}.safetensors", _recipe_json(p))["tensors"] for p in POLICIES}
    for key in embeddings:
        assert not a[key].equal(b[key])
        # GRAD_V on XL: BASE 0, IN00 1 -> current supermerger and bbc-mc take B, sd-mecha keeps A
        # through BASE, supermerger 2023-2025 never merged them ("Not Merge").
        assert runs["supermerger"][key].equal(b[key]), key
        assert runs["bbc-mc"][key].equal(b[key]), key
        assert runs["sd-mecha"][key].equal(a[key]), key
        assert runs["supermerger-2023"][key].equal(a[key]), key
    # Everything else is the same table under the three supermerger-style policies.
    others = [k for k in a if k not in embeddings]
    assert all(runs["supermerger-2023"][k].equal(runs["supermerger"][k]) for k in others)
    assert any(not runs["supermerger"][k].equal(a[k]) for k in others)


def test_old_recipes_rerun_with_the_meaning_they_were_written_with(sdxl_pair: tuple) -> None:
    # A version-1 recipe written before supermerger-2023 / bbc-mc existed says "supermerger" or
    # nothing, and meant IN00; both must give exactly the bbc-mc (IN00) file.
    folder, _, _ = sdxl_pair
    pinned = _merge_json(folder, "pinned.safetensors", _recipe_json("bbc-mc"))["bytes"]
    for name, blocks in (("named.safetensors", "supermerger"), ("unnamed.safetensors", None)):
        out = _merge_json(folder, name, _recipe_json(blocks))["bytes"]
        body = lambda raw: raw[8 + int.from_bytes(raw[:8], "little"):]  # noqa: E731  (tensor data only)
        assert body(out) == body(pinned), name


def test_every_entry_point_defaults_to_the_same_policy() -> None:
    # The board and the live preview build Recipe() without a policy; the CLI and inspect name one.
    import inspect as pyinspect

    from lib_merge.cli import build_parser
    from lib_merge.inspect import inspect_models
    from lib_merge.recipe import Recipe

    assert Recipe("weighted_sum", ("a", "b")).blocks == DEFAULT_POLICY
    assert pyinspect.signature(inspect_models).parameters["policy"].default == DEFAULT_POLICY
    assert build_parser().parse_args(["inspect", "a.safetensors"]).blocks == DEFAULT_POLICY
