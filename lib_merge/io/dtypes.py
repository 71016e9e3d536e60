"""The safetensors dtype codes and their torch equivalents (torch 2.1 has no uint16/32/64)."""
from __future__ import annotations

import torch

from ..errors import BadParameterError

_CODES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}

# Only the names this torch build actually has: a table row for a missing dtype would fail at
# read time with an AttributeError instead of a clear "unsupported dtype" message.
CODE_TO_TORCH: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _CODES.items() if hasattr(torch, name)
}
TORCH_TO_CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in CODE_TO_TORCH.items()}

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# CLI / recipe names of output dtypes.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
# fp8 is for the U-Net: text encoders and VAE are kept at this precision (what Forge casts them to
# at load anyway, and what model-mixer's "Save as FP8: UNet" writes).
FP8_OTHER_COMPONENTS = torch.float16


def itemsize(code: str) -> int:
    return torch.empty((), dtype=CODE_TO_TORCH[code]).element_size()


def output_dtype(name: str) -> torch.dtype:
    try:
        return OUTPUT_DTYPES[name]
    except KeyError:
        raise BadParameterError(
            f"dtype={name!r}: choose one of {', '.join(OUTPUT_DTYPES)}"
        ) from None


def key_output_dtype(dtype: torch.dtype, key: str, fp8_everything: bool = False) -> torch.dtype:
    """The output dtype of ``key`` for the requested ``dtype``: fp8 applies to U-Net keys only
    unless ``fp8_everything``."""
    if dtype in FP8 and not fp8_everything and not key.startswith("model.diffusion_model."):
        return FP8_OTHER_COMPONENTS
    return dtype


def copy_cast(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out.copy_(src)``, saturating for fp8: torch's casts round to nearest even but do not
    saturate (e4m3fn turns |x| > 464 into NaN, e5m2 |x| ≥ 61440 into inf), so clamp to ±max first."""
    if out.dtype in FP8:
        limit = torch.finfo(out.dtype).max
        return out.copy_(src.float().clamp(-limit, limit))
    return out.copy_(src)


def cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``src.to(dtype)`` with :func:`copy_cast`'s saturation."""
    if dtype in FP8:
        return copy_cast(torch.empty(src.shape, dtype=dtype), src)
    return src.to(dtype)
