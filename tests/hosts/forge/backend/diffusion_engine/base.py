# Follows backend/diffusion_engine/base.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/diffusion_engine/base.py: ForgeDiffusionEngine (sd15.StableDiffusion / sdxl.StableDiffusionXL
in the parts processing, the LoRA built-in and the adapters touch): ``forge_objects.unet`` is a
UnetPatcher over a KModel, with the ``_original`` and ``_after_applying_lora`` copies; no ``.model``."""
import torch

from backend.modules.k_model import KModel
from backend.patcher.unet import UnetPatcher


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    """Without ``encoder`` (a text-encoder stand-in) the engine holds U-Net weights only, as the
    Merge Board's tests load them: processing takes the U-Net's fingerprint for an image."""

    is_sdxl = False
    is_sd1, is_sd2, is_sd3 = True, False, False

    def __init__(self, diffusion_model, storage_dtype=torch.float16, computation_dtype=None, *, encoder=None):
        self.kmodel = KModel(diffusion_model, storage_dtype, computation_dtype or storage_dtype)
        self.forge_objects_original = ForgeObjects(UnetPatcher(self.kmodel, torch.device("cpu"), torch.device("cpu")))
        self.forge_objects = self.forge_objects_original.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.encoder = encoder
        self.weights_only = encoder is None

    def get_learned_conditioning(self, prompts):
        return self.encoder(prompts)
