"""Block-weight vectors: one weight per block of an architecture, parsed from the forms users paste
from other tools (supermerger strings, runtime-block-merge's 25 values, preset names, dicts).

String grammar (comma-separated items, whitespace ignored, case-insensitive):

* ``NAME=value`` sets one block (``IN4`` and ``IN04`` are the same; ``M``/``MID`` mean ``M00``),
  ``IN04-IN06=value`` an inclusive range in block order, ``OUT*=value`` every matching block;
* a single bare number sets the base value of every block;
* a preset name (``GRAD_V``); see ``lib_merge.presets``;
* exactly 26 / 25 bare numbers for SD1.x/SD2.x, or 20 / 19 for SDXL (which also takes supermerger's
  26 / 25, truncated to the XL blocks).

Overrides apply after the bare number, preset or vector, whatever their position in the string.
Weights are B's share: 0 keeps model A.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .arch.spec import SDXL, ArchSpec, get_arch
from .errors import BadBlockWeightsError
from .presets import PRESETS, PRESETS_XL

__all__ = [
    "blocks_for",
    "format_block_weights",
    "parse_block_weights",
    "preset_names",
    "preset_values",
]

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NUMBERED_BLOCK = re.compile(r"^(IN|OUT)(\d{1,2})$")
_MIDDLE_ALIASES = ("M", "M0", "M00", "MID", "MID00", "MIDDLE")

# The 26-value layout (BASE, IN00-IN11, M00, OUT00-OUT11) and the slots supermerger keeps for
# SDXL: BASE and IN00-IN08, M00, OUT00-OUT08; IN09-IN11 and OUT09-OUT11 are dropped.
_FULL_LEN = 26
_XL_KEEP = tuple(range(0, 10)) + (13,) + tuple(range(14, 23))


def blocks_for(arch: ArchSpec | str) -> Tuple[str, ...]:
    """The block names of ``arch`` in weight-vector order."""
    return get_arch(arch).blocks


def _is_xl(spec: ArchSpec) -> bool:
    return len(spec.blocks) == len(SDXL.blocks)


def preset_names(arch: ArchSpec | str) -> List[str]:
    """Preset names usable for ``arch``: all 26-value presets, plus the XL-only ones for SDXL."""
    spec = get_arch(arch)
    names = list(PRESETS)
    if _is_xl(spec):
        names += [n for n in PRESETS_XL if n not in PRESETS]
    return names


def _expected_counts(spec: ArchSpec) -> str:
    full = len(spec.blocks)
    if _is_xl(spec):
        return (
            f"{full} (BASE first) or {full - 1} (without BASE) numbers, or supermerger's "
            f"{_FULL_LEN} or {_FULL_LEN - 1} (truncated to the XL blocks)"
        )
    return f"{full} (BASE first) or {full - 1} (without BASE) numbers"


def _name_ranges(spec: ArchSpec) -> str:
    """The valid block names in a few words: 'BASE, IN00-IN11, M00, OUT00-OUT11'."""
    groups: List[List[str]] = []
    for name in spec.blocks:
        if groups and groups[-1][0].rstrip("0123456789") == name.rstrip("0123456789"):
            groups[-1].append(name)
        else:
            groups.append([name])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def _error(spec: ArchSpec, problem: str) -> BadBlockWeightsError:
    # The bad token first; then the rules in one short sentence (a list of every block name
    # made a 600-character error line).
    return BadBlockWeightsError(
        f"{problem}. {spec.label} block weights are {_expected_counts(spec)}, NAME=value overrides "
        f"with NAME in {_name_ranges(spec)} (also IN04-IN06=0.3, OUT*=1), or a preset (`python -m lib_merge methods`)"
    )


def _finite(value: float, spec: ArchSpec, item: str) -> float:
    if not math.isfinite(value):
        raise _error(spec, f"weight {item!r} is not a finite number")
    return value


def _number(text: str) -> Optional[float]:
    text = text.strip()
    return float(text) if _NUMBER.match(text) else None


def _to_float(value: Any, spec: ArchSpec, item: str) -> float:
    if isinstance(value, bool):
        raise _error(spec, f"weight {item!r} is a boolean, not a number")
    if isinstance(value, numbers.Real):
        return _finite(float(value), spec, item)
    if isinstance(value, str):
        parsed = _number(value)
        if parsed is not None:
            return _finite(parsed, spec, item)
    raise _error(spec, f"weight {item!r} is not a number")


def _vector(values: Sequence[float], spec: ArchSpec, source: str) -> Dict[str, float]:
    full = len(spec.blocks)
    n = len(values)
    vec: Sequence[float]
    if n == full:
        vec = values
    elif n == full - 1:
        # No BASE slot (runtime-block-merge): text encoder and VAE stay model A's.
        vec = [0.0, *values]
    elif _is_xl(spec) and n == _FULL_LEN:
        vec = [values[i] for i in _XL_KEEP]
    elif _is_xl(spec) and n == _FULL_LEN - 1:
        padded = [0.0, *values]
        vec = [padded[i] for i in _XL_KEEP]
    else:
        hint = ""
        if not _is_xl(spec) and n in (len(SDXL.blocks), len(SDXL.blocks) - 1):
            hint = f" ({n} values are an SDXL vector)"
        raise _error(spec, f"got {n} numbers in {source!r}{hint}")
    return dict(zip(spec.blocks, (float(v) for v in vec)))


def _preset(name: str, spec: ArchSpec) -> Optional[Dict[str, float]]:
    wanted = name.strip().upper()
    if _is_xl(spec):
        for key, values in PRESETS_XL.items():
            if key.upper() == wanted:
                return dict(zip(spec.blocks, values))
    for key, values in PRESETS.items():
        if key.upper() == wanted:
            return _vector(values, spec, key)
    return None


def preset_values(name: str, arch: ArchSpec | str) -> Tuple[float, ...]:
    """The weights a preset gives each block of ``arch``, in block order."""
    spec = get_arch(arch)
    found = _preset(name, spec)
    if found is None:
        raise _error(spec, f"unknown preset {name!r}")
    return tuple(found.values())


def _single_block(name: str, spec: ArchSpec, item: str) -> str:
    text = name.strip().upper()
    m = _NUMBERED_BLOCK.match(text)
    if m:
        text = f"{m.group(1)}{int(m.group(2)):02d}"
    elif text in _MIDDLE_ALIASES:
        text = "M00"
    if text not in spec.blocks:
        raise _error(spec, f"unknown block {name.strip()!r} in {item!r}")
    return text


def _block_names(name: str, spec: ArchSpec, item: str) -> List[str]:
    """The blocks a NAME, NAME-NAME range or wildcard pattern selects."""
    text = name.strip().upper()
    if not text:
        raise _error(spec, f"missing block name in {item!r}")
    if "*" in text:
        pattern = re.compile("^" + ".*".join(re.escape(p) for p in text.split("*")) + "$")
        matched = [b for b in spec.blocks if pattern.match(b)]
        if not matched:
            raise _error(spec, f"pattern {name.strip()!r} in {item!r} matches no block")
        return matched
    if "-" in text:
        parts = text.split("-")
        if len(parts) != 2:
            raise _error(spec, f"bad block range {name.strip()!r} in {item!r}")
        lo = spec.blocks.index(_single_block(parts[0], spec, item))
        hi = spec.blocks.index(_single_block(parts[1], spec, item))
        if lo > hi:
            raise _error(
                spec, f"block range {name.strip()!r} in {item!r} runs backwards (write it low-high)"
            )
        return list(spec.blocks[lo:hi + 1])
    return [_single_block(text, spec, item)]


def _positional(items: List[str], spec: ArchSpec, base: float, text: str) -> Dict[str, float]:
    if not items:
        return dict.fromkeys(spec.blocks, base)
    parsed = [_number(i) for i in items]
    if all(v is not None for v in parsed):
        values = [_finite(v, spec, i) for v, i in zip(parsed, items)]  # type: ignore[arg-type]
        if len(values) == 1:
            return dict.fromkeys(spec.blocks, values[0])
        return _vector(values, spec, text)
    words = [i for i, v in zip(items, parsed) if v is None]
    for word in words:
        if _preset(word, spec) is None:
            raise _error(spec, f"{word!r} is neither a number nor a known preset")
    if len(items) > 1:
        raise _error(
            spec,
            f"preset {words[0]!r} cannot be combined with other bare items in {text!r}; "
            "adjust a preset with NAME=value overrides",
        )
    return _preset(words[0], spec)  # type: ignore[return-value]


def _apply_override(weights: Dict[str, float], item: str, spec: ArchSpec) -> None:
    name, _, value_text = item.partition("=")
    value = _number(value_text)
    if value is None:
        raise _error(spec, f"bad number {value_text.strip()!r} in {item!r}")
    value = _finite(value, spec, item)
    for block in _block_names(name, spec, item):
        weights[block] = value


def _parse_string(text: str, spec: ArchSpec, base: float) -> Dict[str, float]:
    items = [part.strip() for part in text.split(",")]
    if len(items) > 1 and items[-1] == "":
        items.pop()  # a trailing comma is harmless
    if items == [""]:
        return dict.fromkeys(spec.blocks, base)
    positional: List[str] = []
    overrides: List[str] = []
    for position, item in enumerate(items, 1):
        if not item:
            raise _error(spec, f"empty item at position {position} in {text!r}")
        (overrides if "=" in item else positional).append(item)
    weights = _positional(positional, spec, base, text)
    for item in overrides:
        _apply_override(weights, item, spec)
    return weights


def parse_block_weights(
    spec: Any, arch: ArchSpec | str, base: float = 0.0
) -> Dict[str, float]:
    """A weight for every block of ``arch``, in block order.

    ``spec`` is None (every block = ``base``), a number (every block), a sequence of numbers (see
    the module docstring for the counts), a mapping ``block -> value`` applied over ``base`` (keys
    may be ranges or wildcards), or a string in the grammar above. Raises
    ``BadBlockWeightsError`` naming the bad item, the accepted counts and the block names.
    """
    arch_spec = get_arch(arch)
    base_value = _to_float(base, arch_spec, f"base={base!r}")
    if spec is None:
        weights = dict.fromkeys(arch_spec.blocks, base_value)
    elif isinstance(spec, str):
        weights = _parse_string(spec, arch_spec, base_value)
    elif isinstance(spec, bool):
        raise _error(arch_spec, f"block weights {spec!r} is a boolean, not a number")
    elif isinstance(spec, numbers.Real):
        weights = dict.fromkeys(arch_spec.blocks, _to_float(spec, arch_spec, repr(spec)))
    elif isinstance(spec, Mapping):
        weights = dict.fromkeys(arch_spec.blocks, base_value)
        for key, value in spec.items():
            item = f"{key}={value}"
            if not isinstance(key, str):
                raise _error(arch_spec, f"block name {key!r} is not a string")
            number = _to_float(value, arch_spec, item)
            for block in _block_names(key, arch_spec, item):
                weights[block] = number
    else:
        if hasattr(spec, "tolist") and not isinstance(spec, (list, tuple)):
            spec = spec.tolist()  # numpy arrays and torch tensors
        if not isinstance(spec, Sequence) or isinstance(spec, bytes):
            raise _error(
                arch_spec, f"unsupported block-weight value of type {type(spec).__name__}"
            )
        values = [_to_float(v, arch_spec, repr(v)) for v in spec]
        if not values:
            weights = dict.fromkeys(arch_spec.blocks, base_value)
        elif len(values) == 1:
            weights = dict.fromkeys(arch_spec.blocks, values[0])
        else:
            weights = _vector(values, arch_spec, ",".join(repr(v) for v in spec))
    return {block: weights[block] for block in arch_spec.blocks}


def _format_number(value: float) -> str:
    if value == 0:
        return "0"  # also folds -0.0
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_block_weights(weights: Mapping[str, float], arch: ArchSpec | str) -> str:
    """The canonical string of a complete weight dict: every block's value in block order,
    shortest round-trip form (``0,1,0.5,...``); ``parse_block_weights`` reads it back exactly."""
    spec = get_arch(arch)
    resolved: Dict[str, float] = {}
    for key, value in weights.items():
        item = f"{key}={value}"
        block = _single_block(str(key), spec, item)
        resolved[block] = _to_float(value, spec, item)
    missing = [b for b in spec.blocks if b not in resolved]
    if missing:
        raise _error(spec, f"no weight for block(s) {', '.join(missing)}")
    return ",".join(_format_number(resolved[b]) for b in spec.blocks)
