"""The untitled conditioning (no prompt: empty, zero or gibberish) in the host's own structures.

Built with the host's ``prompt_parser`` so the sampler's denoiser takes it exactly where it takes
the prompt's conds; a small cache (per model, prompts and size) spares the text encoder a rerun
for every pass and generation. Both hosts share this: Forge kept A1111's ``prompt_parser``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from ... import untitled as untitled_lib
from ...guidance.settings import GuidanceSettings

_COND_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_COND_CACHE_SIZE = 8


def _autocast():
    try:
        from modules import devices

        return devices.autocast()
    except Exception:
        import contextlib

        return contextlib.nullcontext()


def compute_untitled_conds(model, mode: str, seeds: list[int], *, width: int, height: int, steps: int):
    """(cond, uncond) in the host's prompt_parser structures for ``mode``, cached per model and prompts.

    Built with the host's own ``prompt_parser`` from the untitled prompts, exactly as the host
    builds its conds (the negative marked negative, so SDXL zeroes an empty one like the host
    does); ``zero`` then zeroes the text parts (SDXL keeps its size/crop embeddings).
    """
    from modules import prompt_parser

    if mode == "gibberish":
        prompts = [untitled_lib.gibberish_prompt(int(s)) for s in seeds]
        negatives = [""] * len(seeds)
    else:
        prompts, negatives = untitled_lib.untitled_prompts(mode, 0, len(seeds))
    key = (id(model), getattr(model, "sd_model_hash", None), mode, tuple(prompts), int(width), int(height))
    if key in _COND_CACHE:
        _COND_CACHE.move_to_end(key)
        return _COND_CACHE[key]
    with torch.no_grad(), _autocast():
        cond = prompt_parser.get_multicond_learned_conditioning(
            model, prompt_parser.SdConditioning(prompts, width=width, height=height), steps
        )
        uncond = prompt_parser.get_learned_conditioning(
            model, prompt_parser.SdConditioning(negatives, is_negative_prompt=True, width=width, height=height), steps
        )
    if mode == "zero":
        for composables in cond.batch:
            for composable in composables:
                composable.schedules = [s._replace(cond=untitled_lib.zero_like_conditioning(s.cond)) for s in composable.schedules]
        uncond = [[s._replace(cond=untitled_lib.zero_like_conditioning(s.cond)) for s in schedules] for schedules in uncond]
    _COND_CACHE[key] = (cond, uncond)
    while len(_COND_CACHE) > _COND_CACHE_SIZE:
        _COND_CACHE.popitem(last=False)
    return cond, uncond


def _schedules(entry) -> list:
    """(end step, cond) pairs of one image: a cond entry (one weight-1 sub-prompt) or an uncond one."""
    if isinstance(entry, (list, tuple)) and entry and hasattr(entry[0], "schedules"):
        if len(entry) != 1 or float(entry[0].weight) != 1.0:
            return [("sub-prompts", len(entry))]  # never equal to an uncond's schedule list
        entry = entry[0].schedules
    return [(s.end_at_step, s.cond) for s in entry]


class Untitled:
    """The untitled conditioning of one sampling pass, recomputed if the model changes (refiner)."""

    def __init__(self, mode: str, seeds: list[int], width: int, height: int, steps: int, model_getter: Callable[[], Any]):
        self.mode, self.seeds, self.width, self.height, self.steps = mode, list(seeds), width, height, steps
        self.model_getter = model_getter
        self._same: Optional[tuple] = None

    def conds(self):
        return compute_untitled_conds(
            self.model_getter(), self.mode, self.seeds, width=self.width, height=self.height, steps=self.steps
        )

    def same_cond(self) -> bool:
        """c ≡ u for the current model: the mode says so for the text, and the built conds agree
        in everything else (the SDXL refiner embeds a different aesthetic score per side)."""
        model = self.model_getter()
        key = (id(model), getattr(model, "sd_model_hash", None))
        if self._same is None or self._same[0] != key:
            cond, uncond = self.conds()
            same = untitled_lib.untitled_same_cond(
                self.mode, is_sdxl=bool(getattr(model, "is_sdxl", False)),
                cond=[_schedules(c) for c in cond.batch], uncond=[_schedules(u) for u in uncond],
            )
            self._same = (key, same)
        return self._same[1]


def untitled_for(p, settings: GuidanceSettings, model_getter: Callable[[], Any]) -> Optional[Untitled]:
    """The pass's untitled conditioning (computed now, before sampling, and cached), or None."""
    if settings.untitled == "off":
        return None
    hires = bool(getattr(p, "is_hr_pass", False))
    width = getattr(p, "hr_upscale_to_x", None) if hires else None
    height = getattr(p, "hr_upscale_to_y", None) if hires else None
    seeds = list(getattr(p, "seeds", None) or [getattr(p, "seed", 0)] * int(getattr(p, "batch_size", 1)))
    u = Untitled(settings.untitled, seeds, int(width or p.width), int(height or p.height), int(p.steps), model_getter)
    u.conds()
    return u
