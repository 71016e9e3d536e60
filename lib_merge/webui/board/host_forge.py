"""The Merge Board's host adapter for Forge (``modules``/``backend`` imported lazily).

Forge's ``shared.sd_model`` is a ForgeDiffusionEngine without ``.model``; the U-Net weights live
in ``sd_model.forge_objects.unet.model`` (a KModel shared by every clone of the UnetPatcher), its
``.diffusion_model`` having the ldm names. Until the first generation the model is a
``FakeInitialModel``: nothing to patch, and the board says so.

LoRA: ``KModel.lora_loader.backup`` maps a parameter name to its pre-LoRA Parameter; the next LoRA
refresh puts those back. So for a key with a backup, the merged value goes into the backup and
the LoRA is re-applied by Forge's own ``LoraLoader.refresh(..., force_refresh=True)`` with the
current patcher's ``lora_patches``; other keys are written in place (resolved by name each time,
because Forge's memory manager may swap Parameter objects). Non-float storage (fp8, nf4/fp4, GGUF)
is refused with one message. Forge loads models under ``torch.inference_mode``, so writes happen
inside it.
"""
from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...live import LiveMergeError, LiveTarget, WriteItem, get_attr
from .host import PreviewRequest, PreviewResult
from .host_a1111 import A1111Host, refresh_checkpoint_list

UNET_PREFIX = "model.diffusion_model."
KMODEL_PREFIX = "diffusion_model."
_FLOAT_STORAGE = (torch.float16, torch.bfloat16, torch.float32)
STORAGE_MESSAGE = (
    "live preview needs float weights, but Forge stores this U-Net as {what}; set "
    "'Diffusion in Low Bits' to Automatic to preview (saving merged files works either way)"
)


class ForgeTarget(LiveTarget):
    label = "Forge"

    def __init__(self, sd_model: Any):
        patcher = sd_model.forge_objects.unet
        self.kmodel = patcher.model
        super().__init__({UNET_PREFIX: self.kmodel.diffusion_model})
        self.owner = sd_model
        self._backup_lock = threading.Lock()
        self._relora = False
        self._storage_checked = False

    def identity(self) -> tuple:
        return (id(self.owner), id(self.kmodel), id(self.kmodel.diffusion_model))

    def check(self) -> None:
        storage = getattr(self.kmodel, "storage_dtype", None)
        if storage is not None and storage not in _FLOAT_STORAGE:
            raise LiveMergeError(STORAGE_MESSAGE.format(what=storage))
        # The storage of this model object is fixed (Forge reloads into a new object when it changes):
        # every parameter is checked once; later only a few, for an unload to the meta device.
        params = self.kmodel.diffusion_model.parameters()
        for param in params if not self._storage_checked else itertools.islice(params, 4):
            if getattr(param, "bnb_quantized", None) is not None:
                raise LiveMergeError(STORAGE_MESSAGE.format(what="bitsandbytes nf4/fp4"))
            if getattr(param, "gguf_cls", None) is not None:
                raise LiveMergeError(STORAGE_MESSAGE.format(what="GGUF"))
            if param.dtype not in _FLOAT_STORAGE:
                raise LiveMergeError(STORAGE_MESSAGE.format(what=str(param.dtype).replace("torch.", "")))
            if param.device.type == "meta":
                raise LiveMergeError("Forge unloaded the model (its weights are gone); generate once to load it again")
        self._storage_checked = True

    def _loader(self):
        return getattr(self.kmodel, "lora_loader", None)

    def original(self, key: str) -> torch.Tensor:
        loader = self._loader()
        name = KMODEL_PREFIX + key[len(UNET_PREFIX):]
        backup = getattr(loader, "backup", {}).get(name) if loader is not None else None
        return backup if backup is not None else get_attr(self.kmodel, name)

    def write(self, items: Sequence[WriteItem]) -> None:
        loader = self._loader()
        backups = getattr(loader, "backup", {}) if loader is not None else {}
        with torch.inference_mode():
            for item in items:
                name = KMODEL_PREFIX + item.key[len(UNET_PREFIX):]
                if name in backups:
                    old = backups[name]
                    value = item.value.to(device=old.device, dtype=old.dtype, copy=True)
                    with self._backup_lock:
                        backups[name] = torch.nn.Parameter(value, requires_grad=False)
                        self._relora = True
                else:
                    get_attr(self.kmodel, name).copy_(item.value)

    def flush(self) -> None:
        # One forced LoRA refresh per apply re-applies the LoRA on top of the new backups.
        with self._backup_lock:
            relora, self._relora = self._relora, False
        if relora:
            patcher = self.owner.forge_objects.unet
            with torch.inference_mode():
                self._loader().refresh(lora_patches=patcher.lora_patches, offload_device=patcher.offload_device,
                                       force_refresh=True)


class ForgeHost(A1111Host):
    name = "forge"
    has_sampler = True

    @staticmethod
    def _model() -> Any:
        from modules import sd_models

        model = getattr(sd_models.model_data, "sd_model", None)
        if model is None or getattr(model, "forge_objects", None) is None:
            return None  # FakeInitialModel: Forge loads the checkpoint at the first generation
        return model

    def loaded_checkpoint(self) -> Optional[Path]:
        model = self._model()
        info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
        return Path(info.filename) if info is not None else None

    def live_target(self) -> Optional[ForgeTarget]:
        model = self._model()
        return ForgeTarget(model) if model is not None else None

    def notes(self) -> list[str]:
        notes = ["Live preview patches the loaded model's U-Net (BASE — text encoders, VAE — is merged on save)."]
        if self._model() is None:
            notes.append("Forge loads the model at the first generation: generate once (or press Preview) "
                         "before the live preview can patch it.")
        return notes

    def after_save(self, path: Path) -> None:
        refresh_checkpoint_list()
        try:  # Forge's checkpoint dropdown reads its own lists
            from modules_forge import main_entry

            main_entry.refresh_models()
        except Exception:
            pass

    def run_preview(self, request: PreviewRequest, session) -> PreviewResult:
        from modules import call_queue
        from modules_forge import main_thread

        with call_queue.queue_lock:
            # Forge runs every generation on its main thread
            result = main_thread.run_and_wait_result(self._generate_safely, request, session)
        if isinstance(result, BaseException):
            raise result
        if result is None:
            raise RuntimeError("Forge's main thread returned no result (see the console)")
        return result

    def _generate_safely(self, request: PreviewRequest, session):
        try:
            from modules import sd_models

            sd_models.forge_model_reload()
            return self._generate(request, session)
        except BaseException as exc:  # handed back to the tab's thread
            return exc

