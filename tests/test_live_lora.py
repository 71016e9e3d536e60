"""LoRAs in the live preview: the patched model holds exactly what the saved file holds (also in a
block at 0, and for `merge A --lora X`), a LoRA change rewrites only the keys that LoRA touches,
removing it gives back the plain merge, restore gives A, and a bad LoRA changes nothing."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge.engine import merge
from lib_merge.errors import MergeError
from lib_merge.io.reader import open_checkpoint
from lib_merge.live import LiveMerge, LiveTarget
from lib_merge.lora.synthetic import synthetic_lora
from lib_merge.recipe import Recipe

from tests.hosts.common.checkpoints import PREFIX, loaded_unet, write_checkpoint
from tests.test_a1111_text import processing  # noqa: F401  (fixture: A1111's conditioning caches)

WIDTH = 16
ZERO_BLOCK = "IN04"  # the block at merge weight 0 in every recipe here
IN04 = "input_blocks.4."  # its keys in the U-Net (SD1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("live_lora")
    out = {}
    for flavour in ("sd1", "sdxl"):
        a, b = (write_checkpoint(root / f"{flavour}_{i}.safetensors", flavour, seed=i, width=WIDTH) for i in range(2))
        with open_checkpoint(a) as reader:
            shapes = reader.shapes()
        out[flavour] = (a, b, shapes)
    return out


def _lora(path, shapes, arch, *, seed=5, kind="lora", only=None, conv=True):
    tensors = synthetic_lora(shapes, arch, kind=kind, rank=3, seed=seed, conv=conv)
    if only is not None:
        tensors = {k: v for k, v in tensors.items() if k.startswith(only)}
    save_file(tensors, str(path))
    return path


def _entry(path, strength=1.0, weights=None):
    return {"path": str(path), "sha256": "", "strength": strength, "weights": weights}


def _saved(recipe, tmp_path, name="out.safetensors"):
    result = merge(recipe, tmp_path / name, hash_inputs=False, hash_output=False, durable=False, overwrite=True)
    return load_file(str(result.path))


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


def _mismatched(unet, saved):
    return [k for k, v in unet.state_dict().items() if not _same_bits(v, saved[PREFIX + k])]


def _versions(unet):
    return {k: (v._version, v.detach().clone()) for k, v in unet.state_dict(keep_vars=True).items()}


def _written(unet, before):
    return {k for k, v in unet.state_dict(keep_vars=True).items() if v._version != before[k][0]}


def _unchanged(unet, before):
    return [k for k, v in unet.state_dict().items() if not _same_bits(v, before[k][1])]


def _lora_keys(unet, shapes, arch, *paths, weights=None):
    """The U-Net keys the LoRA files patch (bound as the save path binds them), which a change of
    those LoRAs may rewrite."""
    from lib_merge.arch import get_arch
    from lib_merge.lora.formats import LoraFile
    from lib_merge.lora.patches import LoraSpec, bind

    files = [LoraFile(p) for p in paths]
    try:
        binding = bind([(f, LoraSpec(str(f.path), 1.0, weights)) for f in files], shapes, get_arch(arch), "supermerger")
    finally:
        for f in files:
            f.close()
    return {k[len(PREFIX):] for k in binding.patches if k.startswith(PREFIX)} & set(unet.state_dict())


@pytest.mark.parametrize("flavour, kind", [("sd1", "lora"), ("sd1", "full"), ("sd1", "loha"), ("sdxl", "lora")])
def test_live_lora_equals_the_saved_file_also_in_a_block_at_zero(files, tmp_path, flavour, kind):
    a, b, shapes = files[flavour]
    lora = _lora(tmp_path / "style.safetensors", shapes, flavour, kind=kind)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights=f"{ZERO_BLOCK}=0", dtype="fp16",
                    loras=(_entry(lora, 0.8, "OUT03=0.5"),))
    unet = loaded_unet(a, flavour, torch.float16)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    report = live.apply(recipe)
    saved = _saved(recipe, tmp_path)
    assert _mismatched(unet, saved) == []
    # the block at 0 is A for the method, but the LoRA changed it, in the preview as in the file
    zero = [k for k in _lora_keys(unet, shapes, flavour, lora) if k.startswith(IN04)]
    assert zero and all(not _same_bits(unet.state_dict()[k], original[k]) for k in zero)
    # BASE (text encoders) is merged in the file only, and said so; the LoRA's share is said with it
    assert report.save_only_parts == ["text encoders"] and report.lora_save_only_parts == []
    live.close()


def test_strength_change_rewrites_only_that_loras_keys(files, tmp_path):
    a, b, shapes = files["sd1"]
    everywhere = _lora(tmp_path / "all.safetensors", shapes, "sd1", conv=False)
    down = _lora(tmp_path / "down.safetensors", shapes, "sd1", seed=9, only="lora_unet_down_blocks_1")
    models = (str(a), str(b))
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(Recipe("weighted_sum", models, alpha=0.5, weights=f"{ZERO_BLOCK}=0",
                      loras=(_entry(everywhere, 0.5), _entry(down, 1.0))))
    touched_by_down = _lora_keys(unet, shapes, "sd1", down)
    assert touched_by_down and all(k.startswith(("input_blocks.4.", "input_blocks.5.", "input_blocks.6.")) for k in touched_by_down)
    before = _versions(unet)
    recipe = Recipe("weighted_sum", models, alpha=0.5, weights=f"{ZERO_BLOCK}=0",
                    loras=(_entry(everywhere, 0.5), _entry(down, 0.25)))
    report = live.apply(recipe)
    written = _written(unet, before)
    # exactly the keys the changed LoRA touches, no other key of those blocks nor of the other LoRA
    assert written == touched_by_down and report.keys == len(touched_by_down)
    assert _mismatched(unet, _saved(recipe, tmp_path)) == []
    # the other LoRA's strength: only its keys (every transformer Linear), none of the convs or norms
    before = _versions(unet)
    recipe = Recipe("weighted_sum", models, alpha=0.5, weights=f"{ZERO_BLOCK}=0",
                    loras=(_entry(everywhere, 0.9), _entry(down, 0.25)))
    report = live.apply(recipe)
    written = _written(unet, before)
    assert written == _lora_keys(unet, shapes, "sd1", everywhere) and report.keys == len(written)
    assert all(k.endswith(".weight") and ("attn" in k or "ff.net" in k or "proj_" in k) for k in written)
    assert _mismatched(unet, _saved(recipe, tmp_path, "again.safetensors")) == []
    # the same recipe again writes nothing
    before = _versions(unet)
    assert live.apply(recipe).keys == 0 and _written(unet, before) == set()
    live.close()


def test_removing_the_lora_gives_the_plain_merge_and_restore_gives_a(files, tmp_path):
    a, b, shapes = files["sd1"]
    lora = _lora(tmp_path / "style.safetensors", shapes, "sd1")
    plain = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights=f"{ZERO_BLOCK}=0")
    unet = loaded_unet(a, "sd1", torch.float16)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(plain.replace(loras=(_entry(lora, 0.7),)))
    lora_keys = _lora_keys(unet, shapes, "sd1", lora)
    before = _versions(unet)
    report = live.apply(plain)
    assert _written(unet, before) == lora_keys and report.keys == len(lora_keys)
    assert _mismatched(unet, _saved(plain, tmp_path)) == []
    # back on, then restore: A bit for bit, the block at 0 included
    live.apply(plain.replace(loras=(_entry(lora, 0.7),)))
    live.restore()
    assert [k for k, v in unet.state_dict().items() if not _same_bits(v, original[k])] == []
    assert not live.is_patched
    live.close()


def test_single_model_with_a_lora_is_merge_a_lora(files, tmp_path):
    """`merge A --lora X`: only the LoRA's keys change, to the saved file's values."""
    a, _, shapes = files["sdxl"]
    lora = _lora(tmp_path / "xl.safetensors", shapes, "sdxl")
    recipe = Recipe("weighted_sum", (str(a),), dtype="fp16", loras=(_entry(lora, 0.6, "M00=0"),))
    unet = loaded_unet(a, "sdxl", torch.float16)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    before = _versions(unet)
    report = live.apply(recipe)
    assert _mismatched(unet, _saved(recipe, tmp_path)) == []
    keys = _lora_keys(unet, shapes, "sdxl", lora)
    assert _written(unet, before) == keys and report.keys == len(keys)
    # nothing is merged, but the LoRA trains the text encoders, which this target does not hold
    assert report.save_only_blocks == [] and report.lora_save_only_parts == ["text encoders"]
    assert "LoRAs also change the text encoders of the saved file" in report.summary()
    live.restore()
    assert [k for k, v in unet.state_dict().items() if not _same_bits(v, original[k])] == []
    live.close()


def test_a_lora_rewritten_on_disk_is_patched_anew(files, tmp_path):
    a, b, shapes = files["sd1"]
    path = _lora(tmp_path / "style.safetensors", shapes, "sd1", seed=1)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, loras=(_entry(path, 1.0),))
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    live.apply(recipe)
    stat = path.stat()
    _lora(path, shapes, "sd1", seed=2)  # same name, new weights (a retrained LoRA)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert live.apply(recipe).keys == len(_lora_keys(unet, shapes, "sd1", path))
    assert _mismatched(unet, _saved(recipe, tmp_path)) == []
    live.close()
    assert live.loras._files == {}  # closed with the session


@pytest.mark.parametrize("damage", ["truncated", "nan", "sdxl_lora", "not_a_lora"])
def test_a_bad_lora_is_one_error_and_the_model_stays_as_it_was(files, tmp_path, damage):
    a, b, shapes = files["sd1"]
    good = _lora(tmp_path / "good.safetensors", shapes, "sd1")
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        data = _lora(tmp_path / "whole.safetensors", shapes, "sd1", seed=3).read_bytes()
        bad.write_bytes(data[: len(data) - 1000])
    elif damage == "nan":
        tensors = synthetic_lora(shapes, "sd1", rank=3, seed=3)
        name = next(k for k in tensors if k.endswith("lora_up.weight"))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, str(bad))
    elif damage == "sdxl_lora":
        save_file(synthetic_lora(files["sdxl"][2], "sdxl", rank=3, seed=3), str(bad))
    else:
        save_file(load_file(str(b)), str(bad))  # a checkpoint picked as a LoRA
    plain = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights=f"{ZERO_BLOCK}=0")
    unet = loaded_unet(a, "sd1", torch.float16)
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    with_good = plain.replace(loras=(_entry(good, 0.7),))
    live.apply(with_good)
    before = _versions(unet)
    with pytest.raises(MergeError) as caught:
        live.apply(with_good.replace(loras=(_entry(good, 0.3), _entry(bad, 1.0))))
    message = str(caught.value)
    assert "bad.safetensors" in message and "\n" not in message and "good.safetensors" not in message
    assert _written(unet, before) == set() and _unchanged(unet, before) == []
    assert live.is_patched and live.apply(with_good).keys == 0  # the session goes on where it was
    assert _mismatched(unet, _saved(with_good, tmp_path)) == []
    live.close()


def test_a1111_text_encoders_take_the_lora_in_the_preview(tmp_path, processing):
    """On A1111 the text encoders are in the live target: a LoRA's text-encoder modules patch them
    (BASE at 0 for the merge), equal to the saved file, and the conditioning caches are emptied."""
    from lib_merge.webui.board.host_a1111 import A1111Target
    from tests.test_a1111_text import hijacked_sd1_model

    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=0, width=WIDTH)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=1, width=WIDTH)
    with open_checkpoint(a) as reader:
        lora = _lora(tmp_path / "style.safetensors", reader.shapes(), "sd1")
    model = hijacked_sd1_model(a)
    target = A1111Target(model)
    original = {k: v.detach().clone() for k, v in target.tensors().items()}
    live = LiveMerge(target, a)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="BASE=0", loras=(_entry(lora, 0.6),))
    report = live.apply(recipe)
    assert report.lora_save_only_parts == []  # this target holds the text encoders: nothing is file-only
    saved = load_file(str(merge(recipe, tmp_path / "out.safetensors", hash_inputs=False, hash_output=False,
                                durable=False).path))
    patched = target.tensors()
    assert [k for k in patched if not torch.equal(patched[k], saved[k].to(patched[k].dtype))] == []
    text = [k for k in patched if k.startswith("cond_stage_model.") and not torch.equal(patched[k], original[k])]
    assert text  # BASE is A for the merge; the LoRA changed the encoder
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    live.restore()
    assert all(torch.equal(v, original[k]) for k, v in target.tensors().items())
    live.close()


@pytest.mark.parametrize("method, alpha", [("cosine_a", -0.2), ("cosine_b", 0.3)])
def test_a_lora_on_a_cosine_merge_equals_the_saved_file(models, tmp_path, method, alpha):
    """cosine's keys carry the planner's whole-model similarity range besides α: the live jobs keep
    it (they used to be rebuilt from the block's α alone and the method refused to run)."""
    from tests.test_a1111_text import module_tree

    a, b = models.sd1_a, models.sd1_b
    with open_checkpoint(a) as reader:
        lora = _lora(tmp_path / "style.safetensors", reader.shapes(), "sd1")
    state = load_file(str(a))
    unet = module_tree({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
    live = LiveMerge(LiveTarget({PREFIX: unet}), a)
    recipe = Recipe(method, (str(a), str(b)), alpha=alpha, weights=f"{ZERO_BLOCK}=0", loras=(_entry(lora, 0.5),))
    live.apply(recipe)
    assert _mismatched(unet, _saved(recipe, tmp_path)) == []
    live.close()
