"""Data shards for the Diffusion Soup experiment: the training stream restricted to one value set
of one attribute.

Diffusion Soup (arXiv 2406.08431) fine-tunes one model per shard of the data and averages them.
It splits two ways, and so do we: *domain* shards by what is drawn (here the shape family) and
*aesthetic* shards by how it is drawn (here the palette of the style family). Every shard stays
inside the training split: a shard never sees a held-out (shape, colour, texture) combination,
so held-out prompts test every model alike.

A shard's stream is deterministic and indexable like ``data.make_batch``: sample *i* depends on
(seed, shard, i) only, whatever batch size asks for it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Dict, Sequence, Tuple

import torch

from .data import VALUES, Attributes, Batch, render_stream, sample_attributes


@dataclass(frozen=True)
class Shard:
    name: str
    attribute: str
    values: Tuple[str, ...]

    def __post_init__(self):
        unknown = [v for v in self.values if v not in VALUES[self.attribute]]
        if unknown or not self.values:
            raise ValueError(f"shard {self.name!r}: {self.attribute} has no value(s) {unknown or '(none given)'}")

    def contains(self, attrs: Attributes) -> bool:
        return getattr(attrs, self.attribute) in self.values


# Shape families that look alike to a small model, so each domain shard is a coherent "domain".
DOMAIN_SHARDS = (
    Shard("round", "shape", ("circle", "ring")),
    Shard("square", "shape", ("square", "diamond")),
    Shard("pointed", "shape", ("triangle", "cross")),
)
AESTHETIC_SHARDS = tuple(Shard(p, "palette", (p,)) for p in VALUES["palette"])
SHARD_FAMILIES: Dict[str, Tuple[Shard, ...]] = {"domain": DOMAIN_SHARDS, "aesthetic": AESTHETIC_SHARDS}


def _sample_seed(seed: int, shard: str, index: int, attempt: int) -> int:
    digest = hashlib.sha256(f"toy-shard/{seed}/{shard}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard_attributes(gen: torch.Generator, shard: Shard | None) -> Attributes:
    """Training-split attributes with the shard's attribute drawn from its own values (resampled
    until the combination is a training one, so the held-out split stays unseen)."""
    while True:
        attrs = sample_attributes(gen, "train")
        if shard is None:
            return attrs
        value = shard.values[int(torch.randint(len(shard.values), (), generator=gen))]
        attrs = replace(attrs, **{shard.attribute: value})
        if attrs.split == "train":
            return attrs


def make_shard_batch(n: int, *, seed: int, shard: Shard | None, resolution: int = 16, start: int = 0) -> Batch:
    """Samples ``start .. start+n-1`` of the shard's training stream (``shard=None``: the union)."""
    name = shard.name if shard is not None else "union"

    def draw(index: int):
        gen = torch.Generator().manual_seed(_sample_seed(seed, name, index, 0))
        return gen, shard_attributes(gen, shard)

    return render_stream(range(start, start + n), draw, resolution)


def shard_by_name(name: str) -> Shard:
    for family in SHARD_FAMILIES.values():
        for shard in family:
            if shard.name == name:
                return shard
    known = ", ".join(s.name for f in SHARD_FAMILIES.values() for s in f)
    raise ValueError(f"no shard {name!r}; known: {known}")


def shard_of(attrs: Attributes, family: Sequence[Shard]) -> Shard | None:
    """The shard of ``family`` that ``attrs`` belongs to (None if none does)."""
    return next((s for s in family if s.contains(attrs)), None)
