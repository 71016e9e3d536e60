"""Untitled generation: what to sample with when there is no prompt at all.

Modes (``GuidanceSettings.untitled``; write the choice to the infotext):

* ``empty``: prompt and negative are "". On SD1.x/SD2.x both encode identically, so c ≡ u and
  CFG does nothing (skip the uncond pass). On SDXL the hosts zero an empty *negative* but
  encode an empty positive normally, so c ≠ u there.
* ``zero``: both conditionings zeroed, SDXL's native null (caption dropout zeroes the text
  embeddings); SDXL keeps its size/crop embeddings. c ≡ u, except where the host conditions the
  two sides differently beyond the text: the SDXL refiner embeds an aesthetic score of 6.0 for the
  prompt and 2.5 for the negative (both hosts' defaults). Off-distribution for SD1.x (its null is
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


def same_conditioning(a: Any, b: Any) -> bool:
    """Whether two conditionings (tensors, dicts, lists, tuples) hold the same structure and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype))
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            same_conditioning(a[k], b[k]) for k in a
        )
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            same_conditioning(x, y) for x, y in zip(a, b)
        )
    return a == b


def untitled_same_cond(mode: str, *, is_sdxl: bool, cond: Any = None, uncond: Any = None) -> bool:
    """Whether the mode makes the cond and uncond predictions identical (then the uncond pass is skipped).

    The mode alone says whether the *text* parts match. Pass the built ``cond`` and ``uncond`` to
    also require everything else to match: per-side extras such as the SDXL refiner's aesthetic
    score (6.0 prompt / 2.5 negative) make c ≠ u even for ``zero``.
    """
    if mode == "zero":
        text_same = True
    elif mode == "empty":
        # SDXL hosts zero the empty negative only; SD1/SD2 encode "" the same for both.
        text_same = not is_sdxl
    else:
        text_same = False
    if not text_same or (cond is None and uncond is None):
        return text_same
    return same_conditioning(cond, uncond)
