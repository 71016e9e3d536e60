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
}


def itemsize(code: str) -> int:
    return torch.empty((), dtype=CODE_TO_TORCH[code]).element_size()


def output_dtype(name: str) -> torch.dtype:
    try:
        return OUTPUT_DTYPES[name]
    except KeyError:
        raise BadParameterError(
            f"dtype={name!r}: choose one of {', '.join(OUTPUT_DTYPES)}"
        ) from None
