"""Model references: a checkpoint path, or a virtual input usable wherever a model is —
``noise(seed=…, scale=…)`` (Gaussian noise scaled to each tensor's std in model A) and ``zero``.

Virtual inputs make recipes like "slerp A towards noise, then back" (a controlled noisy state)
expressible with the ordinary methods.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import BadParameterError
from .methods.registry import key_seed

_VIRTUAL = re.compile(r"^\s*(noise|zero)\s*(?:\((.*)\))?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class VirtualInput:
    kind: str  # "noise" | "zero"
    seed: int = 0
    scale: float = 1.0

    @property
    def spec(self) -> str:
        if self.kind == "zero":
            return "zero"
        return f"noise(seed={self.seed},scale={self.scale:g})"

    @property
    def name(self) -> str:
        return self.spec

    def make(self, key: str, template: torch.Tensor) -> torch.Tensor:
        """The virtual tensor for ``key``, shaped like ``template`` (model A's fp32 tensor)."""
        if self.kind == "zero":
            return torch.zeros_like(template, dtype=torch.float32)
        gen = torch.Generator().manual_seed(key_seed(self.seed, key, "noise"))
        noise = torch.randn(template.shape, generator=gen, dtype=torch.float32)
        std = float(template.float().std(correction=0)) if template.numel() > 1 else 0.0
        return noise.mul_(std * self.scale)


def parse_model_ref(text: str) -> str | VirtualInput:
    """A path stays a string; ``noise``, ``noise(seed=3, scale=0.5)`` and ``zero`` become virtual."""
    match = _VIRTUAL.match(text)
    if not match:
        return text
    kind = match.group(1).lower()
    args: dict[str, str] = {}
    if match.group(2):
        for part in match.group(2).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise BadParameterError(f"{text!r}: write virtual inputs as noise(seed=1,scale=0.5)")
            name, value = (s.strip() for s in part.split("=", 1))
            args[name] = value
    if kind == "zero":
        if args:
            raise BadParameterError(f"{text!r}: 'zero' takes no arguments")
        return VirtualInput("zero")
    unknown = set(args) - {"seed", "scale"}
    if unknown:
        raise BadParameterError(f"{text!r}: noise takes seed= and scale=, not {', '.join(sorted(unknown))}")
    try:
        seed, scale = int(args.get("seed", 0)), float(args.get("scale", 1.0))
    except ValueError:
        raise BadParameterError(f"{text!r}: seed must be an integer and scale a number") from None
    if not math.isfinite(scale):  # the noise itself would be NaN/Inf in every key
        raise BadParameterError(f"{text!r}: scale must be a finite number, e.g. scale=0.5")
    return VirtualInput("noise", seed, scale)
