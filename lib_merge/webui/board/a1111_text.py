"""A1111's text encoders seen through checkpoint key names, so the live preview can merge them
(block BASE) like the U-Net and show what Save will write.

A1111 wraps each text encoder for prompt weighting and textual inversion (``sd_hijack``): the
tensor stored as ``cond_stage_model.transformer.text_model.embeddings.token_embedding.weight``
lives at ``cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
.weight``. Dropping the ``wrapped`` steps gives back the checkpoint's names (SD1/SD2
``cond_stage_model.…``, SDXL ``conditioner.embedders.N.…``).

Writes go through ``load_state_dict`` on the module the Lora built-in patches, so its backups are
dropped as for the U-Net. open_clip's attention is a ``MultiheadAttention`` whose LoRA backup covers
its ``out_proj`` child too, so keys of that child are written through the attention module.

A1111 caches the conditioning of the last prompts (``persistent_cond_cache``) keyed without the
weights, and the empty prompt's conditioning it pads prompts of different lengths with: after the
text encoder changes, the caches are emptied (in place — a generation in progress holds the same
lists) and the empty prompt is encoded again.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

import torch

TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
WRAPPER_STEP = "wrapped"
# The Lora built-in's backups of a MultiheadAttention: (in_proj_weight, out_proj.weight), out_proj.bias.
_MHA_WEIGHT_BACKUP = {"in_proj_weight": 0, "out_proj.weight": 1}


def text_encoder_root(sd_model: Any) -> Optional[tuple[str, torch.nn.Module]]:
    """(checkpoint prefix, module) of the loaded model's text encoders, or None."""
    conditioner = getattr(sd_model, "conditioner", None)
    if isinstance(conditioner, torch.nn.Module):
        return "conditioner.", conditioner
    cond = getattr(sd_model, "cond_stage_model", None)
    if isinstance(cond, torch.nn.Module):
        return "cond_stage_model.", cond
    return None


def checkpoint_name(path: str) -> str:
    return ".".join(step for step in path.split(".") if step != WRAPPER_STEP)


def _own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    persistent = ((k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set)
    for leaf, tensor in itertools.chain(module._parameters.items(), persistent):
        if tensor is not None:
            yield leaf, tensor


def index_text_encoders(prefix: str, root: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Checkpoint key -> (module to ``load_state_dict`` into, the key's name inside it)."""
    modules = dict(root.named_modules())
    index: dict[str, tuple[torch.nn.Module, str]] = {}
    for path, module in modules.items():
        parent_path, _, child = path.rpartition(".")
        parent = modules.get(parent_path) if path else None
        for leaf, _ in _own_tensors(module):
            key = prefix + checkpoint_name(f"{path}.{leaf}" if path else leaf)
            if isinstance(parent, torch.nn.MultiheadAttention) and child == "out_proj":
                index.setdefault(key, (parent, f"out_proj.{leaf}"))
            else:
                index.setdefault(key, (module, leaf))
    return index


def lora_backup(module: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """A's value of ``name`` inside ``module`` kept by the Lora built-in while a LoRA is applied."""
    if isinstance(module, torch.nn.MultiheadAttention):
        if name in _MHA_WEIGHT_BACKUP:
            backup = getattr(module, "network_weights_backup", None)
            return backup[_MHA_WEIGHT_BACKUP[name]] if isinstance(backup, tuple) else None
        backup = getattr(module, "network_bias_backup", None) if name == "out_proj.bias" else None
    else:
        attr = {"weight": "network_weights_backup", "bias": "network_bias_backup"}.get(name)
        backup = getattr(module, attr, None) if attr else None
    return backup if isinstance(backup, torch.Tensor) else None


def forget_cached_conditioning() -> None:
    """Empty A1111's caches of computed prompt conditioning (their keys ignore the weights)."""
    try:
        from modules import processing
    except ImportError:
        return
    owners = (getattr(processing, "StableDiffusionProcessing", None),
              getattr(processing, "StableDiffusionProcessingTxt2Img", None))
    for owner, name in itertools.product(owners, ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")):
        cache = getattr(owner, name, None) if owner is not None else None
        if isinstance(cache, list):
            cache[:] = [None] * len(cache)


def refresh_empty_prompt(sd_model: Any) -> None:
    """Encode the empty prompt again with the current text encoders, as A1111 does after a load."""
    if not hasattr(sd_model, "cond_stage_model_empty_prompt"):
        return
    try:
        from modules import devices, sd_models

        with devices.autocast(), torch.no_grad():
            sd_model.cond_stage_model_empty_prompt = sd_models.get_empty_cond(sd_model)
    except Exception as exc:  # only prompts padded to another length use it: never fail the patch over it
        print(f"[Merge Board] could not encode the empty prompt again ({type(exc).__name__}: {exc}); "
              "prompts of different lengths may be padded with A's", flush=True)
