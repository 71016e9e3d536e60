"""Per-block LoRA strength: our block-weight syntax (``--weights``'s), plus the LoRA Block Weight
extension's presets and its short vectors, mapped onto our blocks by name (lora-reference.md §3).

LBW's 26 (SD1) and 20 (SDXL) IDs are exactly our block names; its 17- and 12-value vectors name
only the transformer-bearing blocks and, as its ``to26`` does, every other block gets 0.
"""
from __future__ import annotations

from typing import Any

from ..arch import ArchSpec, get_arch
from ..blocks import parse_block_weights
from ..errors import BadBlockWeightsError

LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12))
LBW12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6))

# LBW's default presets (17 values, SD1), decoded to the blocks they switch on.
_ON = {
    "NONE": (),
    "ALL": LBW17,
    "INS": ("BASE", "IN01", "IN02", "IN04"),
    "IND": ("BASE", "IN05", "IN07", "IN08"),
    "INALL": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"),
    "MIDD": ("BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"),
    "OUTD": ("BASE", "OUT03", "OUT04", "OUT05", "OUT06"),
    "OUTS": ("BASE",) + tuple(f"OUT{i:02d}" for i in range(7, 12)),
    "OUTALL": ("BASE",) + tuple(f"OUT{i:02d}" for i in range(3, 12)),
}
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    name: tuple(1.0 if block in on else 0.0 for block in LBW17) for name, on in _ON.items()
}
LBW_PRESETS["ALL0.5"] = (0.5,) * 17
LBW_PREFIX = "lbw:"


def lora_block_weights(spec: Any, arch: ArchSpec | str) -> dict[str, float]:
    """A strength factor per block of ``arch`` (1 everywhere when ``spec`` is None).

    ``lbw:NAME`` is an LBW preset (SD1's 17 slots; on SDXL its names outside the 12 slots are
    ignored, as LBW's own SDXL handling), a 17-value (SD1/SD2) or 12-value (SDXL) list is an LBW
    vector, zero-filled; anything else is our block-weight syntax over a base of 1."""
    a = get_arch(arch)
    if spec is None:
        return dict.fromkeys(a.blocks, 1.0)
    text = spec.strip() if isinstance(spec, str) else None
    if text and text.lower().startswith(LBW_PREFIX):
        name = text[len(LBW_PREFIX):].strip().upper()
        if name not in LBW_PRESETS:
            raise BadBlockWeightsError(f"LoRA block weights {text!r}: unknown LBW preset; one of {', '.join(LBW_PRESETS)}")
        named = dict(zip(LBW17, LBW_PRESETS[name]))
        return {b: named.get(b, 0.0) for b in a.blocks}
    values = _numbers(spec)
    slots = LBW12 if a.name == "sdxl" else LBW17
    if values is not None and len(values) == len(slots):
        named = dict(zip(slots, values))
        return {b: named.get(b, 0.0) for b in a.blocks}
    return parse_block_weights(spec, a, base=1.0)


def _numbers(spec: Any) -> list[float] | None:
    items = spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, (list, tuple)) else None
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None
