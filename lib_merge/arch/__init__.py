"""Architectures: what a checkpoint is (detection from its header), which block each key belongs
to, which keys may be averaged, and generated key layouts for synthetic checkpoints."""
from __future__ import annotations

from .detect import detect_architecture
from .keys import (
    BLOCK_POLICIES,
    DEFAULT_POLICY,
    block_of,
    component_of,
    kept_from_a,
    key_kind,
    keys_by_block,
)
from .layouts import full_layout, unet_layout
from .spec import ARCHITECTURES, SD1, SD2, SDXL, ArchSpec, ModelInfo, get_arch

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "BLOCK_POLICIES",
    "DEFAULT_POLICY",
    "ModelInfo",
    "SD1",
    "SD2",
    "SDXL",
    "block_of",
    "component_of",
    "detect_architecture",
    "full_layout",
    "get_arch",
    "kept_from_a",
    "key_kind",
    "keys_by_block",
    "unet_layout",
]
