"""Untitled generation: what to sample with when there is no prompt at all.

Modes (``GuidanceSettings.untitled``; write the choice to the infotext):

* ``empty``: prompt and negative are "". On SD1.x/SD2.x both encode identically, so c ≡ u and
  CFG does nothing (skip the uncond pass). On SDXL the hosts zero an empty *negative* but
  encode an empty positive normally, so c ≠ u there.
* ``zero``: both conditionings zeroed, SDXL's native null (caption dropout zeroes the text
  embeddings); SDXL keeps its size/crop embeddings. c ≡ u. Off-distribution for SD1.x (its null is
  the encoded ""), so treat it as experimental there.
* ``gibberish``: a reproducible random-token prompt per image (an arbitrary fixed direction);
  the negative stays "". Record the seed, the string follows from it.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .errors import BadParameterError
from .guidance.settings import UNTITLED_MODES

# SDXL's ADM vector is [bigG pooled text (1280), Fourier size/crop/target embeddings (256 each)]:
# 2816 = 1280 + 6·256 for the base, 2560 = 1280 + 5·256 (sizes, crop, aesthetic score) for the refiner.
SDXL_POOLED_TEXT_DIMS = 1280

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _byte_stream(seed: int):
    counter = 0
    while True:
        yield from hashlib.sha256(f"untitled-gibberish:{int(seed)}:{counter}".encode()).digest()
        counter += 1


def gibberish_prompt(seed: int, n_tokens: int = 20) -> str:
    """``n_tokens`` pronounceable lowercase pseudo-words derived from ``seed`` (same seed, same string, on any Python)."""
    if n_tokens < 1:
        raise BadParameterError(f"n_tokens={n_tokens!r}: need at least one word")
    # SHA-256 in counter mode, unlike ``random``, is fixed by its spec and cannot drift across versions.
    stream = _byte_stream(seed)
    words = []
    for _ in range(n_tokens):
        syllables = 1 + next(stream) % 3
        word = ""
        for _ in range(syllables):
            word += _CONSONANTS[next(stream) % len(_CONSONANTS)] + _VOWELS[next(stream) % len(_VOWELS)]
        if next(stream) % 2:
            word += _CONSONANTS[next(stream) % len(_CONSONANTS)]
        words.append(word)
    return " ".join(words)


def zero_like_conditioning(cond: Any) -> Any:
    """Zero conditioning of the same structure: tensors zeroed; SDXL dicts zero ``crossattn`` and the text part of ``vector``."""
    if isinstance(cond, torch.Tensor):
        return torch.zeros_like(cond)
    if isinstance(cond, dict):
        out = dict(cond)
        if "crossattn" in out:
            out["crossattn"] = torch.zeros_like(out["crossattn"])
        if "vector" in out:
            vector = out["vector"]
            if vector.shape[-1] <= SDXL_POOLED_TEXT_DIMS:
                raise BadParameterError(
                    f"SDXL vector has {vector.shape[-1]} dims; expected the 1280 pooled-text dims followed by size embeddings"
                )
            kept = vector.clone()
            kept[..., :SDXL_POOLED_TEXT_DIMS] = 0
            out["vector"] = kept
        return out
    if isinstance(cond, (list, tuple)):
        return type(cond)(zero_like_conditioning(c) for c in cond)
    raise BadParameterError(f"cannot zero a conditioning of type {type(cond).__name__}")


def untitled_prompts(mode: str, seed: int, batch: int) -> tuple[list[str], list[str]]:
    """(prompts, negative prompts) for ``batch`` images; gibberish uses ``seed + i`` for image i, like A1111's seeds."""
    if mode not in UNTITLED_MODES or mode == "off":
        raise BadParameterError(f"untitled mode {mode!r}: choose one of {', '.join(m for m in UNTITLED_MODES if m != 'off')}")
    if batch < 1:
        raise BadParameterError(f"batch={batch!r}: need at least one image")
    negatives = [""] * batch
    if mode == "gibberish":
        return [gibberish_prompt(seed + i) for i in range(batch)], negatives
    return [""] * batch, negatives


def untitled_same_cond(mode: str, *, is_sdxl: bool) -> bool:
    """Whether the mode makes the cond and uncond predictions identical (then the uncond pass is skipped)."""
    if mode == "zero":
        return True
    if mode == "empty":
        # SDXL hosts zero the empty negative only; SD1/SD2 encode "" the same for both.
        return not is_sdxl
    return False
