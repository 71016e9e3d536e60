# Follows backend/patcher/lora.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/patcher/lora.py: LoraLoader.refresh restores every backed-up Parameter, then backs up
and replaces each patched key with a new Parameter (only "diff" patches here)."""
import torch

from backend import utils


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        for (key, online_mode), current in all_patches.items():
            weight = utils.get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            merged = weight.float()
            for strength_patch, patch, strength_model, offset, function in current:
                kind, (delta,) = patch
                assert kind == "diff"
                merged = merged * strength_model + strength_patch * delta.float()
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes
