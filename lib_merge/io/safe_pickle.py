"""Loading ``.ckpt``/``.pt`` state dicts without ever running code from the file.

A pickle runs code by naming a global (``os.system``, ``builtins.eval`` …) and calling it. We hand
torch.load an unpickler whose ``find_class`` resolves only an allowlist of tensor-rebuild helpers
and plain containers; training-framework classes that real SD checkpoints carry (Lightning's
``ModelCheckpoint`` callback state) resolve to an inert placeholder that merely stores its
arguments. Anything else is refused before it is called, with the offending global in the message.
"""
from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch

from ..errors import CorruptFileError, UnsafePickleError

_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
for _name in ("_rebuild_parameter_with_state", "_rebuild_tensor_v3"):
    if hasattr(torch._utils, _name):
        _ALLOWED[("torch._utils", _name)] = getattr(torch._utils, _name)

# Benign classes whose state we do not need: pickled training callbacks and loggers.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class _Inert:
    """Stands in for a class we refuse to import; keeps its arguments, does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


def _numpy_allowed(module: str, name: str) -> object | None:
    # global_step is sometimes a numpy scalar: reconstructing one needs numpy's scalar + dtype
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        try:  # numpy >= 2 (touching numpy.core there warns DeprecationWarning)
            from numpy._core.multiarray import scalar
        except ImportError:
            from numpy.core.multiarray import scalar
        return scalar
    if module == "numpy" and name == "dtype":
        import numpy

        return numpy.dtype
    if module.startswith("numpy.dtypes") and name.endswith("DType"):
        import numpy.dtypes

        return getattr(numpy.dtypes, name, None)
    if module == "_codecs" and name == "encode":
        import codecs

        return codecs.encode
    return None


class RestrictedUnpickler(pickle.Unpickler):
    source = "<checkpoint>"

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        allowed_np = _numpy_allowed(module, name)
        if allowed_np is not None:
            return allowed_np
        if module.startswith(_INERT_MODULE_PREFIXES):
            return type(name, (_Inert,), {"__module__": "lib_merge.inert." + module})
        raise UnsafePickleError(
            f"{self.source}: refused to load — the pickle references {module}.{name}, which is not a "
            "tensor or container and could run code; nothing from the file was executed. Convert it "
            "to .safetensors with a trusted tool, or use a safetensors copy of this model"
        )


def _make_pickle_module(source: Path) -> types.ModuleType:
    module = types.ModuleType("lib_merge_restricted_pickle")

    class _Unpickler(RestrictedUnpickler):
        pass

    _Unpickler.source = str(source)
    module.Unpickler = _Unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    module.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return module


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a pickled checkpoint (``state_dict`` unwrapped), memory-mapped when
    the file is in torch's zip format so data pages are read only when a key is used."""
    if not path.exists():
        raise CorruptFileError(f"{path}: file not found; check the path or the models folder")
    pickle_module = _make_pickle_module(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            # legacy (pre-1.6, non-zip) format cannot be mapped; it is small enough to read whole
            obj = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as exc:
        raise CorruptFileError(
            f"{path}: cannot read this pickled checkpoint ({exc.__class__.__name__}: {str(exc)[:200]}); "
            "it is truncated or corrupt"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path}: no state dict inside this pickle; is it a Stable Diffusion checkpoint?")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CorruptFileError(f"{path}: the pickle holds no tensors; is it a Stable Diffusion checkpoint?")
    return tensors
