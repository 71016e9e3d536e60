# Follows modules/sd_models.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/sd_models.py of A1111 1.10: checkpoint list, model_data, load / reload with the
same-object reuse of sd_checkpoints_limit == 1, on_model_loaded after every load."""
import types

import torch

from modules import script_callbacks
from tests.hosts.common import exec_shared

exec_shared("sd_models", globals())  # the checkpoint list, alike in both hosts


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]  # noqa: F821  (shared part)


class FakeLatentDiffusion(torch.nn.Module):
    """What A1111 keeps as shared.sd_model after loading a checkpoint file: LatentDiffusion with
    .model.diffusion_model. Weights only (no text encoder): processing takes its U-Net's fingerprint
    for an image; the guidance tests' denoising model is common.models.A1111Model."""

    weights_only = True

    def __init__(self, unet):
        super().__init__()
        self.model = types.SimpleNamespace(diffusion_model=unet)
        self._unet = unet  # registered so .parameters() sees it
        self.is_sdxl = False


unet_factory = None  # set by the test: fn(path) -> torch.nn.Module holding that file's U-Net


def load_model_weights(model, checkpoint_info):
    from safetensors.torch import load_file

    prefix = "model.diffusion_model."
    sd = {k[len(prefix):]: v for k, v in load_file(checkpoint_info.filename).items() if k.startswith(prefix)}
    model.model.diffusion_model.load_state_dict(sd, strict=False)  # the Lora builtin resets every backup here
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    model.sd_model_hash = None


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []

    def get_sd_model(self):
        if self.sd_model is None:
            load_model()
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        if v in self.loaded_sd_models:
            self.loaded_sd_models.remove(v)
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def load_model(checkpoint_info=None):
    info = checkpoint_info or select_checkpoint()  # noqa: F821  (shared part)
    model = FakeLatentDiffusion(unet_factory(info.filename))
    load_model_weights(model, info)
    model_data.set_sd_model(model)
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info or select_checkpoint()  # noqa: F821  (shared part)
    sd_model = sd_model or model_data.sd_model
    if sd_model is None:
        return load_model(info)
    if sd_model.sd_model_checkpoint == info.filename and not forced_reload:
        return sd_model
    load_model_weights(sd_model, info)  # sd_checkpoints_limit == 1: new weights, same object
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    model = sd_model or model_data.sd_model
    if model is not None:
        model.to("meta")
    model_data.sd_model = None
