"""The toy model family's foundation: procedural data with ground truth, and a toy checkpoint in
the real SD1 layout that lib_merge detects, maps onto 26 blocks, merges and inspects unchanged."""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from pathlib import Path

import pytest
import torch

from lib_merge.arch import block_of, detect_architecture, keys_by_block
from lib_merge.cli import main as cli_main
from lib_merge.io.reader import open_checkpoint
from lib_merge.presets import PRESETS
from lib_merge.toy import (
    Attributes,
    ToyConfig,
    WordTokenizer,
    build_toy_model,
    load_toy_checkpoint,
    make_batch,
    parse_caption,
    render,
    save_toy_checkpoint,
)
from lib_merge.toy.data import COLOURS, SHAPES, TEXTURES, VALUES, combinations
from lib_merge.toy.model import FAMILY_RESOLUTION
from tests.files import load_tensors

DATA = Path(__file__).resolve().parent / "data"
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."


# -- data -----------------------------------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_differs():
    a = make_batch(12, seed=7, resolution=16)
    b = make_batch(12, seed=7, resolution=16)
    c = make_batch(12, seed=8, resolution=16)
    assert a.images.dtype == torch.uint8 and a.images.shape == (12, 3, 16, 16)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert a.captions == b.captions
    assert a.images.numpy().tobytes() != c.images.numpy().tobytes()
    # Sample i does not depend on how many were asked for: a later window is the same stream.
    tail = make_batch(4, seed=7, resolution=16, start=8)
    assert torch.equal(tail.images, a.images[8:]) and tail.captions == a.captions[8:]


def test_heldout_split_is_disjoint_by_construction():
    train, held = set(combinations("train")), set(combinations("heldout"))
    assert not train & held
    assert train | held == set(itertools.product(SHAPES, COLOURS, TEXTURES))
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.2
    # Every single value is seen in training; only some combinations are held out.
    for position, values in enumerate((SHAPES, tuple(COLOURS), TEXTURES)):
        for value in values:
            assert any(combo[position] == value for combo in train)
            assert any(combo[position] == value for combo in held)
    train_batch = make_batch(150, seed=3, resolution=16)
    held_batch = make_batch(60, seed=3, resolution=16, split="heldout")
    assert {a.split for a in train_batch.attributes} == {"train"}
    assert {a.split for a in held_batch.attributes} == {"heldout"}
    with pytest.raises(ValueError, match="split"):
        make_batch(1, seed=0, split="test")


def test_every_attribute_value_is_reachable():
    attrs = make_batch(300, seed=0, resolution=16).attributes
    for name, values in VALUES.items():
        seen = {getattr(a, name) for a in attrs}
        assert seen == set(values), name


def test_captions_parse_back_to_attributes():
    batch = make_batch(100, seed=11, resolution=16)
    for attrs, caption in zip(batch.attributes, batch.captions):
        assert parse_caption(caption) == attrs
    assert batch.captions[0].count(",") == 3 and "background" in batch.captions[0]
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        parse_caption("small purple circle, left, plain background, vivid outlined flat")
    with pytest.raises(ValueError, match="shape given twice"):
        parse_caption("small red circle square, left, plain background, vivid outlined flat")
    with pytest.raises(ValueError, match="no position"):
        parse_caption("small red circle, plain background, vivid outlined flat")
    with pytest.raises(ValueError, match="colour='purple'"):
        Attributes("circle", "purple", "small", "left", "plain", "vivid", "outlined", "flat")


def _attrs(**changes):
    base = dict(shape="square", colour="red", size="large", position="centre", texture="plain",
                palette="vivid", outline="borderless", shading="flat")
    return Attributes(**{**base, **changes})


def test_rendered_pixels_show_the_attributes():
    image = render(_attrs())
    # Centre pixel of a flat vivid shape is exactly its colour; a corner is the plain background.
    assert torch.allclose(image[:, 16, 16], torch.tensor(COLOURS["red"]), atol=1e-6)
    assert torch.allclose(image[:, 0, 0], torch.full((3,), 0.22), atol=1e-6)
    # Each attribute changes the picture (none is a caption-only word).
    alternatives = {name: values[1] if values[0] == getattr(_attrs(), name) else values[0]
                    for name, values in VALUES.items()}
    for name, other in alternatives.items():
        assert not torch.equal(render(_attrs(**{name: other})), image), name
    # Position moves the shape: the red mass's centroid follows left/right.
    def centroid_x(img):
        mass = (img[0] - img[2]).clamp(min=0)
        return float((mass.sum(0) * torch.arange(32.0)).sum() / mass.sum())
    assert centroid_x(render(_attrs(position="left", size="small"))) < 13
    assert centroid_x(render(_attrs(position="right", size="small"))) > 19
    # Size grows the covered area.
    area = {s: float(((render(_attrs(size=s))[0] - 0.22) > 0.3).sum()) for s in ("small", "medium", "large")}
    assert area["small"] < area["medium"] < area["large"]


# -- text side ------------------------------------------------------------------------------------

def test_tokenizer_handles_every_caption_and_the_empty_prompt():
    tok = WordTokenizer()
    empty = tok.encode("")
    assert empty.tolist()[:3] == [tok.bos_id, tok.eos_id, tok.pad_id] and empty.shape == (tok.context_length,)
    names = list(VALUES)
    count = 0
    for combo in itertools.product(*(VALUES[n] for n in names)):
        caption = Attributes(**dict(zip(names, combo))).caption()
        ids = tok.encode(caption)
        assert tok.unk_id not in ids
        count += 1
    assert count == 6 * 8 * 3 * 5 * 5 * 3 * 2 * 2
    sample = make_batch(5, seed=2, resolution=16).captions[4]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.unk_id in tok.encode("a purple unicorn").tolist()
    with pytest.raises(ValueError, match="at most 14"):
        tok.encode(" ".join(["red"] * 15))


def test_text_encoder_accepts_empty_prompt_and_every_word():
    model = build_toy_model(0)
    names = list(VALUES)
    # One caption per value of the longest attribute list covers every word of the grammar.
    longest = max(len(v) for v in VALUES.values())
    captions = [Attributes(**{n: VALUES[n][i % len(VALUES[n])] for n in names}).caption() for i in range(longest)]
    prompts = ["", *captions, "gibberish words nobody trained"]
    with torch.no_grad():
        context = model.encode_prompts(prompts)
    assert context.shape == (len(prompts), 16, model.config.unet.context_dim)
    assert torch.isfinite(context).all()
    # Causal attention: the empty prompt's <bos> position is the same as any caption's.
    assert torch.allclose(context[0, 0], context[1, 0], atol=1e-6)
    assert not torch.allclose(context[0, 1], context[1, 1])


# -- checkpoint layout ----------------------------------------------------------------------------

def _sd1_shapes():
    return json.loads((DATA / "sd1.json").read_text())["shapes"]


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    a = save_toy_checkpoint(build_toy_model(0), folder / "toyA.safetensors")
    b = save_toy_checkpoint(build_toy_model(1), folder / "toyB.safetensors")
    return folder, a, b


def test_toy_checkpoint_has_the_sd1_layout_and_26_blocks(toy_files):
    _, a, _ = toy_files
    with open_checkpoint(a) as reader:
        shapes, metadata = reader.shapes(), reader.metadata
    real = _sd1_shapes()
    unet = {k for k in shapes if k.startswith(UNET)}
    assert unet == {k for k in real if k.startswith(UNET)}
    text = {k for k in shapes if k.startswith("cond_stage_model.")}
    assert text and text <= set(real)
    assert set(shapes) == unet | text  # pixel space: no first_stage_model.*
    info = detect_architecture(shapes, metadata, source="toyA")
    assert info.arch.name == "sd1" and len(info.arch.blocks) == 26 and info.has_text_encoder
    for key in shapes:
        assert block_of("sd1", key) in info.arch.blocks
    ours = {b: len(k) for b, k in keys_by_block("sd1", unet).items()}
    theirs = {b: len(k) for b, k in keys_by_block("sd1", [k for k in real if k.startswith(UNET)]).items()}
    assert ours == theirs and all(ours[b] for b in info.arch.blocks if b != "BASE")
    assert all(block_of("sd1", k) == "BASE" for k in text)


def test_save_load_round_trip_is_bit_exact(toy_files):
    _, a, _ = toy_files
    original = build_toy_model(0).state_dict()
    on_disk = load_tensors(a)
    assert set(on_disk) == set(original)
    assert all(torch.equal(on_disk[k], original[k]) for k in original)
    assert on_disk[TEXT + "embeddings.position_ids"].dtype == torch.int64
    loaded = load_toy_checkpoint(a).state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert build_toy_model(0).config == ToyConfig()


def test_cli_merge_with_block_weights_and_inspect(toy_files, capsys):
    folder, a, b = toy_files
    out = folder / "grad_v.safetensors"
    assert cli_main(["merge", str(a), str(b), "-o", str(out), "--weights", "GRAD_V", "--no-hash"]) == 0
    ta, tb, tm = load_tensors(a), load_tensors(b), load_tensors(out)
    assert set(tm) == set(ta)
    weights = dict(zip(detect_architecture({k: tuple(v.shape) for k, v in ta.items()}).arch.blocks, PRESETS["GRAD_V"]))
    for key in (TEXT + "encoder.layers.0.mlp.fc1.weight", UNET + "time_embed.0.weight",
                UNET + "input_blocks.4.1.proj_in.weight", UNET + "middle_block.0.in_layers.2.weight",
                UNET + "output_blocks.8.0.emb_layers.1.weight", UNET + "out.2.weight"):
        alpha = weights[block_of("sd1", key)]
        expected = torch.lerp(ta[key], tb[key], alpha)
        assert torch.allclose(tm[key].float(), expected, rtol=2e-3, atol=2e-4), (key, alpha)
    # The merged file lost our config metadata; the loader rebuilds it from the shapes.
    # Shapes cannot tell the image size: the family's, unless the caller names it.
    merged = load_toy_checkpoint(out)
    assert merged.config == dataclasses.replace(ToyConfig(), resolution=FAMILY_RESOLUTION)
    assert load_toy_checkpoint(out, resolution=32).config == ToyConfig()
    with torch.no_grad():
        eps = merged(torch.zeros(2, 3, 32, 32), torch.tensor([1, 999]), ["", "red circle"])
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()

    capsys.readouterr()
    assert cli_main(["inspect", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "SD1.x" in text
    rows = [line.split()[0] for line in text.splitlines() if line.split()[:1] and line.split()[0] in weights]
    assert rows == list(weights)


def test_load_refuses_a_checkpoint_that_is_not_a_toy(tmp_path):
    from lib_merge.synthetic import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path / "sd1.safetensors", "sd1", width_divisor=32)
    with pytest.raises(ValueError, match="toy"):
        load_toy_checkpoint(path)


def test_forward_pass_at_32px_on_cpu_is_fast():
    model = build_toy_model(0)
    x = make_batch(1, seed=0).floats()
    with torch.no_grad():
        model(x, torch.tensor([500]), [""])  # warm-up
        best = float("inf")
        for prompt in ("", "large red circle, centre, plain background, vivid outlined flat"):
            start = time.perf_counter()
            eps = model(x, torch.tensor([500]), [prompt])
            best = min(best, time.perf_counter() - start)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert best < 1.0, f"U-Net + text encoder forward took {best:.3f} s"


def test_soup_of_toy_checkpoints_adds_removes_and_loads(toy_files, tmp_path):
    folder, a, b = toy_files
    c = save_toy_checkpoint(build_toy_model(2), tmp_path / "toyC.safetensors")
    pot = str(tmp_path / "pot")
    assert cli_main(["soup", "init", pot]) == 0
    assert cli_main(["soup", "add", pot, str(a), str(b), str(c)]) == 0
    assert cli_main(["soup", "remove", pot, str(c)]) == 0  # "unlearning" one shard
    out = tmp_path / "soup.safetensors"
    assert cli_main(["soup", "export", pot, "-o", str(out)]) == 0
    ta, tb, ts = load_tensors(a), load_tensors(b), load_tensors(out)
    key = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.allclose(ts[key].float(), (ta[key] + tb[key]) / 2, rtol=2e-3, atol=2e-4)
    assert torch.equal(ts[TEXT + "embeddings.position_ids"], ta[TEXT + "embeddings.position_ids"])
    assert load_toy_checkpoint(out, resolution=32).config == ToyConfig()


def test_live_merge_patches_a_loaded_toy_model_and_restores_it(toy_files):
    from lib_merge.live import LiveMerge, LiveTarget
    from lib_merge.recipe import Recipe

    folder, a, b = toy_files
    model = load_toy_checkpoint(a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = LiveMerge(LiveTarget({"model.diffusion_model.": model.unet, "cond_stage_model.": model.cond_stage_model}), a)
    try:
        # fp32 on both sides: at fp16 the file rounds even the weight-0 blocks (A's values),
        # which the live merge rightly leaves untouched in the fp32 model.
        live.apply(Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="GRAD_V", dtype="fp32"))
        saved = folder / "grad_v_live.safetensors"
        assert cli_main(["merge", str(a), str(b), "-o", str(saved), "--weights", "GRAD_V", "--dtype", "fp32", "--no-hash"]) == 0
        on_disk = load_tensors(saved)
        patched = model.state_dict()
        assert [k for k in patched if not torch.equal(patched[k], on_disk[k].to(patched[k].dtype))] == []
        live.restore()
    finally:
        live.close()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_tensor_of_the_wrong_shape_is_named_and_loads_nothing():
    from lib_merge.toy.classifier import build_classifier
    from lib_merge.toy.model import load_checked_state

    for module, config_name in ((build_toy_model(0, ToyConfig()), "the toy config"), (build_classifier(0), "the config")):
        state = {k: v.clone() + 1 for k, v in module.state_dict().items()}
        bad = next(k for k, v in state.items() if v.ndim == 2)
        state[bad] = state[bad][:, :1]
        reader = type("Reader", (), {"get": lambda self, key: state[key]})()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(ValueError, match=rf"x\.safetensors: {re.escape(bad)} has shape .*{config_name} expects"):
            load_checked_state(module, reader, "x.safetensors", config_name)
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
        state[bad] = before[bad] + 1
        load_checked_state(module, reader, "x.safetensors", config_name)
        assert torch.equal(module.state_dict()[bad], before[bad] + 1)
