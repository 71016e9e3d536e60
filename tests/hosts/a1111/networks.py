# Follows extensions-builtin/Lora/networks.py and lora_patches.py of A1111 v1.10.1 (tag v1.10.1).
"""extensions-builtin/Lora/networks.py + lora_patches.py of A1111 1.10, reduced to the weight
bookkeeping: per-module ``network_weights_backup`` / ``network_bias_backup`` /
``network_current_names``; the patched ``_load_from_state_dict`` resets them
(``network_reset_cached_weight``); ``network_apply_weights`` backs up, restores and adds the deltas."""
import torch

loaded_networks = []  # [Network]
_KINDS = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)
_originals = {}


class Network:
    def __init__(self, name, deltas):
        self.name = name
        self.deltas = deltas  # {module name inside the U-Net: weight delta}


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def install():
    for cls in _KINDS:
        original = cls._load_from_state_dict
        _originals[cls] = original

        def patched(self, *args, _original=original, **kwargs):
            network_reset_cached_weight(self)
            return _original(self, *args, **kwargs)

        cls._load_from_state_dict = patched


def uninstall():
    for cls, original in _originals.items():
        cls._load_from_state_dict = original
    _originals.clear()
    loaded_networks.clear()


def network_apply_weights(self, name):
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((n.name,) for n in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{name} - no backup weights found and current weights are not unchanged")
        self.network_weights_backup = self.weight.to("cpu", copy=True)
    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != () and getattr(self, "bias", None) is not None:
        self.network_bias_backup = self.bias.to("cpu", copy=True)
    if current_names != wanted_names:
        with torch.no_grad():
            if getattr(self, "network_weights_backup", None) is not None:
                self.weight.copy_(self.network_weights_backup)
            if getattr(self, "network_bias_backup", None) is not None:
                self.bias.copy_(self.network_bias_backup)
            for net in loaded_networks:
                delta = net.deltas.get(name)
                if delta is not None:
                    self.weight += delta.to(self.weight.dtype)
        self.network_current_names = wanted_names


def apply_to(unet):
    for name, module in unet.named_modules():
        if isinstance(module, _KINDS):
            network_apply_weights(module, name)
