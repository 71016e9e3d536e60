"""Score one toy model under one guidance setting: sample a fixed prompt set over several seeds
and measure what the classifier sees (``metrics``: adherence, Fréchet distance, untitled yield).

Every row of the evidence tables comes from here, so every comparison uses the same prompts,
seeds, sampler, steps and reference images; only the model or the guidance differs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..guidance.settings import GuidanceSettings
from .data import Attributes, make_batch
from .model import ToyModel
from .pixels import clipped_share, saturation
from .sampling import sample

CORE = ("shape", "colour", "texture")  # what a prompt must get right to count as adhered to


@dataclass(frozen=True)
class Protocol:
    prompts: int  # per split (train-split captions + held-out captions)
    seeds: tuple
    steps: int
    sampler: str
    cfg_scale: float
    untitled_images: int
    real_images: int
    batch: int = 96


@dataclass
class Score:
    """Mean and spread (sample sd over sampling seeds) of each metric."""
    values: Dict[str, List[float]] = field(default_factory=dict)
    seconds: float = 0.0
    images: Optional[torch.Tensor] = None  # the first seed's samples, when asked to keep them

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(float(value))

    def mean(self, name: str) -> float:
        return statistics.fmean(self.values[name])

    def sd(self, name: str) -> float:
        v = self.values[name]
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def fmt(self, name: str, digits: int = 3) -> str:
        if name not in self.values:
            return "–"
        return f"{self.mean(name):.{digits}f} ± {self.sd(name):.{digits}f}"


def prompt_set(n: int, seed: int = 777) -> List[Attributes]:
    """``n`` training-split captions and ``n`` held-out ones (fixed; never the training stream's)."""
    return list(make_batch(n, seed=seed, split="train", resolution=8).attributes) + \
        list(make_batch(n, seed=seed, split="heldout", resolution=8).attributes)


class Evaluator:
    def __init__(self, classifier, protocol: Protocol, resolution: int):
        from . import metrics

        self.metrics = metrics
        self.clf = classifier
        self.protocol = protocol
        self.resolution = resolution
        self.wanted = prompt_set(protocol.prompts)
        self.reference = metrics.reference_features(classifier, resolution=resolution, n=protocol.real_images, seed=4242)

    def _sample(self, model: ToyModel, prompts: Sequence[str], seed: int, settings, cfg, untitled) -> torch.Tensor:
        p = self.protocol
        out = []
        for start in range(0, len(prompts), p.batch):
            chunk = list(prompts[start:start + p.batch])
            out.append(sample(model, chunk, seed=seed + start, steps=p.steps, sampler=p.sampler,
                              cfg_scale=p.cfg_scale if cfg is None else cfg, settings=settings, untitled=untitled))
        return torch.cat(out)

    def prompted(self, model: ToyModel, settings: Optional[GuidanceSettings] = None, *, cfg: Optional[float] = None,
                 groups: Optional[Dict[str, callable]] = None, keep_images: bool = False) -> Score:
        """Adherence (all, train-split, held-out, per group) and Fréchet distance over the seeds."""
        m = self.metrics
        score = Score()
        started = time.perf_counter()
        captions = [a.caption() for a in self.wanted]
        n = self.protocol.prompts
        for seed in self.protocol.seeds:
            images = self._sample(model, captions, seed, settings, cfg, "off")
            result = m.prompt_adherence(self.clf, images, self.wanted, attributes=CORE)
            matched = result.matched
            score.add("adherence", sum(matched) / len(matched))
            score.add("adherence_train", sum(matched[:n]) / n)
            score.add("adherence_heldout", sum(matched[n:]) / n)
            for name, member in (groups or {}).items():
                picked = [ok for ok, a in zip(matched, self.wanted) if member(a)]
                score.add(f"adherence[{name}]", sum(picked) / max(1, len(picked)))
            score.add("frechet", m.frechet_distance(m.features(self.clf, images), self.reference))
            score.add("saturation", saturation(images))
            score.add("clipped", clipped_share(images))
            if keep_images and seed == self.protocol.seeds[0]:
                score.images = images
        score.seconds = time.perf_counter() - started
        return score

    def untitled(self, model: ToyModel, settings: Optional[GuidanceSettings] = None, *, cfg: float = 1.0,
                 mode: str = "empty", keep_images: bool = False) -> Score:
        """Untitled yield and Fréchet distance of no-prompt samples over the seeds."""
        m = self.metrics
        score = Score()
        started = time.perf_counter()
        blanks = [""] * self.protocol.untitled_images
        for seed in self.protocol.seeds:
            images = self._sample(model, blanks, seed, settings, cfg, mode)
            score.add("yield", m.untitled_yield(self.clf, images))
            score.add("frechet", m.frechet_distance(m.features(self.clf, images), self.reference))
            score.add("saturation", saturation(images))
            if keep_images and seed == self.protocol.seeds[0]:
                score.images = images
        score.seconds = time.perf_counter() - started
        return score
