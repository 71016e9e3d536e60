"""A ForgeDiffusionEngine stand-in: forge_objects(unet=UnetPatcher(KModel)), no ``.model``."""
import torch

from backend.patcher.base import ModelPatcher


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, storage_dtype):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = storage_dtype
        self.computation_dtype = torch.float16


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    is_sdxl = False

    def __init__(self, diffusion_model, storage_dtype=torch.float16):
        unet = ModelPatcher(KModel(diffusion_model, storage_dtype), torch.device("cpu"), torch.device("cpu"))
        self.forge_objects = ForgeObjects(unet)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
