"""backend/patcher/base.py: ModelPatcher (clone shares the model, copies lora_patches)."""
import copy

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        keys = set(k for k, _ in self.model.named_parameters())
        this = {}
        for k, v in patches.items():
            if k in keys:
                this.setdefault(k, []).append([strength_patch, v, strength_model, None, None])
        self.lora_patches[identifier] = this
        return set(this)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)
