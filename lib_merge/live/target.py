"""Writing through a target: how checkpoint keys map onto a loaded model and how values get into it.

The plain ``LiveTarget`` copies in place; host adapters (``lib_merge.webui.board.host_a1111`` /
``host_forge``) subclass it to write through the WebUI's own paths so LoRA backups stay
consistent. Knows nothing of recipes, plans or originals.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..arch import detect_architecture
from ..errors import MergeError
from ..io.reader import open_checkpoint


class LiveMergeError(MergeError):
    """The live merge cannot run (model changed or unsupported, A is not the loaded model...)."""


def write_context(t: torch.Tensor):
    # Forge loads its models under inference_mode; in-place writes to inference tensors are only
    # allowed inside it, and writes to normal tensors must not record autograd history.
    return torch.inference_mode() if t.is_inference() else torch.no_grad()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (cast and device move included) in the right grad mode."""
    with write_context(dst):
        dst.copy_(src)


def get_attr(root: torch.nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class WriteItem:
    key: str  # checkpoint key, e.g. model.diffusion_model.input_blocks.1.0.in_layers.0.weight
    value: torch.Tensor  # on CPU, in the module's dtype (or fp32 for exotic storage)
    original: bool  # True when ``value`` is A's original (a restore)


class LiveTarget:
    """Maps checkpoint keys onto a loaded model and writes values into it.

    ``modules`` maps a checkpoint-key prefix to the module holding those keys, e.g.
    ``{"model.diffusion_model.": unet}``. Parameters are resolved by name at every use, because
    hosts may replace parameter objects (device swaps, LoRA) between two patches.
    """

    label = "model"

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self.modules = dict(modules)

    # -- identity and checks ----------------------------------------------------------------------
    def identity(self) -> tuple:
        """Changes when the host swaps the model object (another checkpoint, a reload)."""
        return tuple((prefix, id(module)) for prefix, module in self.modules.items())

    def check(self) -> None:
        """Raise ``LiveMergeError`` with one clear sentence when the model cannot be patched."""

    # -- lookup -----------------------------------------------------------------------------------
    def split(self, key: str) -> tuple[torch.nn.Module, str] | None:
        for prefix, module in self.modules.items():
            if key.startswith(prefix):
                return module, key[len(prefix):]
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every patchable tensor by checkpoint key (parameters and persistent buffers)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.modules.items():
            for name, t in module.state_dict(keep_vars=True).items():
                out[prefix + name] = t
        return out

    def current(self, key: str) -> torch.Tensor:
        found = self.split(key)
        if found is None:
            raise KeyError(key)
        module, name = found
        return get_attr(module, name)

    def original(self, key: str) -> torch.Tensor:
        """The value that represents A for ``key`` right now (hosts consult LoRA backups)."""
        return self.current(key)

    # -- writing ----------------------------------------------------------------------------------
    def direct(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The live tensor itself when merged chunks may be streamed straight into it (CPU,
        contiguous; chunks in ``dtype`` are cast on the way in); None sends values through
        ``write``. Host targets that must write through the WebUI's own path return None."""
        if type(self).write is not LiveTarget.write:
            return None
        t = self.current(key)
        if t.device.type == "cpu" and t.is_floating_point() and t.is_contiguous():
            return t
        return None

    def write(self, items: Sequence[WriteItem]) -> None:
        """Copy the values into the model. Called from several threads at once, one key per call
        in general; the caller reuses the values' memory once it returns, so copy, never keep."""
        for item in items:
            copy_into(self.current(item.key), item.value)

    def flush(self) -> None:
        """Called once after the writes of an apply or a restore: finish what is best done once."""


def put(target: LiveTarget, key: str, value: torch.Tensor, original: bool) -> None:
    """``value`` into ``key``: straight into the live tensor when the target allows it, else
    through ``target.write`` (which copies it)."""
    direct = target.direct(key, value.dtype)
    if direct is None:
        target.write([WriteItem(key, value, original)])
    else:
        copy_into(direct, value)


def arch_of_file(path: str | os.PathLike[str]):
    """The architecture record of a checkpoint file (header only): hosts check that the loaded
    model is one the live merge can target."""
    with open_checkpoint(path) as reader:
        return detect_architecture(reader.shapes(), reader.metadata, source=str(path)).arch
