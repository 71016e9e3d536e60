"""The live preview merges A1111's text encoders too (block BASE): through the sd_hijack wrappers,
under checkpoint key names, equal to the saved file, restored bit-exactly, with the prompt
conditioning caches emptied; open_clip's MultiheadAttention is written and backed up as the Lora
built-in does it."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.engine import merge
from lib_merge.live import LiveMerge
from lib_merge.recipe import Recipe
from lib_merge.webui.board.a1111_text import checkpoint_name, index_text_encoders, lora_backup
from lib_merge.webui.board.host_a1111 import A1111Target

from tests.hosts.common.checkpoints import PREFIX, loaded_unet, write_checkpoint

TEXT = "cond_stage_model."


class Wrapper(torch.nn.Module):
    """What sd_hijack puts around a text encoder or its token embedding (``.wrapped``)."""

    def __init__(self, wrapped: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped


def module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        module = root
        for step in path:
            if step not in module._modules:
                module.add_module(step, torch.nn.Module())
            module = module._modules[step]
        if tensor.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, tensor.clone())
    return root


def hijacked_sd1_model(path, dtype=torch.float32):
    """A1111's SD1 ``sd_model`` after sd_hijack: U-Net plus the wrapped CLIP text encoder."""
    state = load_file(str(path))
    encoder = module_tree({k[len(TEXT):]: v.to(dtype) if v.is_floating_point() else v
                           for k, v in state.items() if k.startswith(TEXT)})
    embeddings = encoder.transformer.text_model.embeddings
    embeddings._modules["token_embedding"] = Wrapper(embeddings._modules["token_embedding"])
    model = torch.nn.Module()
    model.model = types.SimpleNamespace(diffusion_model=loaded_unet(path, "sd1", dtype))
    model.cond_stage_model = Wrapper(encoder)
    return model


@pytest.fixture
def processing(monkeypatch):
    """modules.processing's class-level conditioning caches (A1111 1.10)."""
    modules = types.ModuleType("modules")
    module = types.ModuleType("modules.processing")

    class StableDiffusionProcessing:
        cached_c = ["prompts", "conds"]
        cached_uc = ["negative", "unconds"]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        cached_hr_c = ["hr prompts", "hr conds"]
        cached_hr_uc = ["hr negative", "hr unconds"]

    module.StableDiffusionProcessing = StableDiffusionProcessing
    module.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    devices = types.ModuleType("modules.devices")
    devices.autocast = contextlib.nullcontext
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.get_empty_cond = lambda sd_model: ("empty prompt encoded by", sd_model.cond_stage_model)
    modules.processing, modules.devices, modules.sd_models = module, devices, sd_models
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, value in (("processing", module), ("devices", devices), ("sd_models", sd_models)):
        monkeypatch.setitem(sys.modules, f"modules.{name}", value)
    return module


def test_checkpoint_names_drop_the_hijack_wrappers():
    assert checkpoint_name("wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight") == \
        "transformer.text_model.embeddings.token_embedding.weight"


def test_text_encoder_patch_equals_the_file_and_restores(tmp_path, processing):
    a = write_checkpoint(tmp_path / "a.safetensors", "sd1", seed=0)
    b = write_checkpoint(tmp_path / "b.safetensors", "sd1", seed=1)
    model = hijacked_sd1_model(a)
    model.cond_stage_model_empty_prompt = "encoded at load"
    target = A1111Target(model)
    original = {k: v.detach().clone() for k, v in target.tensors().items()}
    text_keys = [k for k in original if k.startswith(TEXT)]
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in text_keys

    live = LiveMerge(target, a)
    recipe = Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights="BASE=0.7,IN04=0.2")
    report = live.apply(recipe)
    assert report.save_only_blocks == [] and "BASE" in report.blocks
    saved = load_file(str(merge(recipe, tmp_path / "out.safetensors", hash_inputs=False, hash_output=False,
                                durable=False).path))
    patched = target.tensors()
    assert [k for k in patched if not torch.equal(patched[k], saved[k].to(patched[k].dtype))] == []
    assert any(not torch.equal(patched[k], original[k]) for k in text_keys)
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    assert processing.StableDiffusionProcessingTxt2Img.cached_hr_uc == [None, None]
    assert model.cond_stage_model_empty_prompt == ("empty prompt encoded by", model.cond_stage_model)

    processing.StableDiffusionProcessing.cached_c[:] = ["prompts", "conds"]
    live.apply(recipe.replace(weights="BASE=0.7,IN04=0.9"))  # the U-Net only: the cache stays
    assert processing.StableDiffusionProcessing.cached_c == ["prompts", "conds"]

    live.restore()
    restored = target.tensors()
    assert all(torch.equal(restored[k].view(-1).view(torch.int32), original[k].view(-1).view(torch.int32))
               for k in original if original[k].dtype == torch.float32)
    assert processing.StableDiffusionProcessing.cached_c == [None, None]
    live.close()


def test_multihead_attention_is_written_and_backed_up_as_one_module():
    """open_clip (SDXL's second encoder) uses MultiheadAttention: the Lora built-in backs up
    (in_proj_weight, out_proj.weight) and out_proj.bias on the attention module and resets them
    in its load_state_dict, so out_proj's keys belong to the attention module."""
    attention = torch.nn.MultiheadAttention(8, 2)
    block = torch.nn.Module()
    block.attn = attention
    root = torch.nn.Module()
    root.add_module("embedders", torch.nn.ModuleList([torch.nn.Module(), Wrapper(torch.nn.Module())]))
    root.embedders[1].wrapped.model = block
    index = index_text_encoders("conditioner.", root)
    key = "conditioner.embedders.1.model.attn.out_proj.weight"
    assert index[key] == (attention, "out_proj.weight")
    assert index["conditioner.embedders.1.model.attn.in_proj_weight"] == (attention, "in_proj_weight")

    assert lora_backup(attention, "out_proj.weight") is None  # no LoRA applied
    backups = (torch.zeros_like(attention.in_proj_weight), torch.ones_like(attention.out_proj.weight))
    attention.network_weights_backup = backups
    attention.network_bias_backup = torch.full_like(attention.out_proj.bias, 2.0)
    assert lora_backup(attention, "in_proj_weight") is backups[0]
    assert lora_backup(attention, "out_proj.weight") is backups[1]
    assert torch.equal(lora_backup(attention, "out_proj.bias"), attention.network_bias_backup)
    assert lora_backup(attention, "in_proj_bias") is None  # LoRA never touches it
