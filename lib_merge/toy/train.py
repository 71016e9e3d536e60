"""ε-prediction training of a toy model on CPU, deterministic for a seed and a thread count.

The objective is SD1's: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with SD's scaled-linear β schedule (the one
the samplers' σ table comes from, so a trained model samples on the same schedule as the WebUI
adapters drive), loss ‖ε̂ − ε‖². One caption in ten is replaced by the empty prompt so the model
learns the unconditional prediction that CFG and untitled sampling read. Every random draw of
step *s* comes from a generator seeded by (seed, stage, s): a run resumed, or one stage
re-run alone, draws the same numbers. The weights written are an exponential moving average of
the trained ones (with warm-up), which is what makes a short CPU run sample cleanly.
"""
from __future__ import annotations

import copy
import hashlib
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..testing.schedules import sd_discrete_sigmas
from .model import ToyModel
from .shards import Shard, make_shard_batch


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup: int = 50
    weight_decay: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of SD's scaled-linear schedule, from the same σ table the samplers use (ᾱ = 1/(1+σ²))."""
    return 1.0 / (1.0 + sd_discrete_sigmas().double() ** 2)


@contextmanager
def _torch_threads(n: int):
    # Results depend on the thread count (reduction order), so a run fixes it and puts it back.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"toy-train/{seed}/{stage}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _lr_at(config: TrainConfig, step: int) -> float:
    # Linear warm-up, then cosine to a tenth: fine-tunes of a few hundred steps end gently.
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: ToyModel,
    config: TrainConfig,
    *,
    stage: str,
    shard: Optional[Shard] = None,
    threads: int = 2,
    progress: Optional[Callable[[int, float], None]] = None,
) -> ToyModel:
    """Train ``model`` in place on ``shard``'s stream (None: the whole training split) and return
    a new model holding the EMA weights. ``stage`` names the run in the seed of every draw."""
    resolution = model.config.resolution
    abar = alphas_cumprod().float()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    model.train()
    with _torch_threads(threads):
        for step in range(config.steps):
            batch = make_shard_batch(config.batch, seed=config.seed, shard=shard, resolution=resolution,
                                     start=step * config.batch)
            x0 = batch.floats()
            gen = _step_generator(config.seed, stage, step)
            t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            drop = torch.rand(x0.shape[0], generator=gen) < config.cond_dropout
            prompts = ["" if d else c for d, c in zip(drop.tolist(), batch.captions)]
            a = abar[t][:, None, None, None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = torch.nn.functional.mse_loss(model(x_t, t, prompts), noise)
            for group in opt.param_groups:
                group["lr"] = _lr_at(config, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p.detach(), 1 - decay)
            if progress is not None:
                progress(step, float(loss.detach()))
    model.eval()
    return ema
