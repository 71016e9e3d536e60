# Follows modules/sd_models.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/sd_models.py of Forge: FakeInitialModel until the first generation, forge_model_reload
driven by forge_loading_parameters (a new ForgeDiffusionEngine object per load, under
torch.inference_mode), reload_model_weights a no-op stub."""

import torch

from modules import script_callbacks
from tests.hosts.common import exec_shared

exec_shared("sd_models", globals())  # the checkpoint list, alike in both hosts


def checkpoint_tiles(use_short=False):
    return [x.name for x in checkpoints_list.values()]  # noqa: F821  (Forge returns names, not titles)


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()
engine_factory = None  # set by the test: fn(checkpoint_info, storage_dtype) -> ForgeDiffusionEngine stand-in


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    pass


def refresh_model_loading_parameters(unet_storage_dtype=None):
    model_data.forge_loading_parameters = dict(checkpoint_info=select_checkpoint(), additional_modules=[],  # noqa: F821  (shared part)
                                               unet_storage_dtype=unet_storage_dtype)


@torch.inference_mode()
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash or not model_data.forge_loading_parameters:
        # (the second test is the stand-in's: the guidance tests assign shared.sd_model themselves
        # and never select a checkpoint; the real function would fail on the missing parameters)
        return model_data.sd_model, False
    model_data.sd_model = None
    info = model_data.forge_loading_parameters["checkpoint_info"]
    sd_model = engine_factory(info, model_data.forge_loading_parameters.get("unet_storage_dtype"))
    sd_model.sd_checkpoint_info = info
    sd_model.filename = info.filename
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
