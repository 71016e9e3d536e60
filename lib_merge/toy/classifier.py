"""A small attribute classifier for the toy images: the judge behind the toy metrics.

One CNN reads a float image in [-1, 1] (N, 3, R, R) and gives one set of logits per attribute of
``data.ATTRIBUTE_NAMES`` (class order = ``data.VALUES[name]``), plus the penultimate features
that the Fréchet distance of ``metrics`` compares. It is trained only on the TRAIN stream of the
generator and scored on the HELDOUT split, whose (shape, colour, texture) combinations training
never saw, so its accuracy there is compositional, not memorised.

Training is deterministic for a seed and a thread count: the initial weights come from the seed
(the global RNG is restored afterwards), the data from ``make_batch``'s seeded stream, and the
augmentation noise from a generator of its own.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..io.reader import open_checkpoint
from ..io.writer import SafetensorsWriter
from .data import ATTRIBUTE_NAMES, VALUES, make_batch
from .model import load_checked_state

METADATA_KEY = "mergeboard.toy.classifier"

# The cheapest schedule measured to clear 95 % on held-out shading at 16×16 for every seed tried
# (1500 steps fell short at 94.8 %); see docs/toy.md, "Metrics", for accuracies and cost.
DEFAULT_STEPS = 2500
DEFAULT_BATCH = 64
DEFAULT_POOL = 24576
DEFAULT_LR = 3e-3
# Per-sample pixel noise, std drawn uniformly in [0, NOISE_MAX] (in [-1, 1] units, about 10
# grey levels at most): a sampler's output keeps some noise, and the judge should read such a
# picture as the picture it is. Not tuned: clean held-out accuracy was the same with 0.04.
NOISE_MAX = 0.08
# Outlier exposure (Hendrycks et al., 2019): each step also shows OUTLIER_SHARE × batch images
# that are no picture of the grammar (white noise, smooth colour blobs, flat fields) with a loss
# pulling every head towards the uniform distribution. Without it the classifier is confidently
# wrong on noise (82–83 % of uniform-noise images got ≥ 0.9 on shape and colour), and the untitled
# yield would count noise as content.
OUTLIER_SHARE = 0.25
OUTLIER_WEIGHT = 0.5


@dataclass(frozen=True)
class ClassifierConfig:
    resolution: int = 16
    width: int = 16  # channels of the first stage; 2× and 4× after each downsampling
    features: int = 64  # penultimate width, the Fréchet distance's dimension

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ClassifierConfig":
        raw = json.loads(text)
        return cls(**{k: int(raw[k]) for k in ("resolution", "width", "features")})


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    # BatchNorm: it trained faster than GroupNorm here (held-out shape 98.7 % vs 97.7 % after the
    # same 2000 steps). In eval mode it applies fixed statistics, so a sample's score does not
    # depend on the other samples in its batch.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


class AttributeClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c, r = self.config.width, self.config.resolution
        if r < 8 or r % 4:
            raise ValueError(f"resolution={r}: a multiple of 4, at least 8")
        # One full-resolution layer only: it is most of the compute. Two of them at width 32
        # took 3.5× as long for 600 steps and ended lower (held-out shape 56 % against 83 %).
        self.body = nn.Sequential(
            _block(3, c, 1),
            _block(c, 2 * c, 2), _block(2 * c, 2 * c, 1),
            _block(2 * c, 4 * c, 2), _block(4 * c, 4 * c, 1),
        )
        # Position is an attribute, so the features keep a 4×4 map rather than a global average;
        # pooling to 4×4 whatever the resolution gives 16 and 32 the same head shapes.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(4 * c * 16, self.config.features), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(self.config.features, len(VALUES[name])) for name in ATTRIBUTE_NAMES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, features) penultimate activations of float images in [-1, 1]."""
        r = self.config.resolution
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"images of shape {tuple(x.shape)}: this classifier reads (N, 3, {r}, {r})")
        return self.project(self.pool(self.body(x.float())))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


def build_classifier(seed: int = 0, config: ClassifierConfig | None = None) -> AttributeClassifier:
    """Seeded initial weights; the global RNG is left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AttributeClassifier(config)
    finally:
        torch.random.set_rng_state(state)


def attribute_targets(attributes) -> Dict[str, torch.Tensor]:
    """Class indices per attribute (order of ``VALUES[name]``) for a sequence of Attributes."""
    return {
        name: torch.tensor([VALUES[name].index(getattr(a, name)) for a in attributes], dtype=torch.long)
        for name in ATTRIBUTE_NAMES
    }


def outlier_images(n: int, resolution: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images in [-1, 1] that show no shape of the grammar: a third each of white noise,
    smooth random colour blobs (2×2 to 8×8 noise upsampled: our guess at what an undertrained sampler draws)
    and flat colour fields with a little noise."""
    kinds = torch.randint(3, (n,), generator=gen)
    white = torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1
    coarse = 2 ** int(torch.randint(1, 4, (), generator=gen))
    blobs = F.interpolate(torch.rand(n, 3, coarse, coarse, generator=gen) * 2 - 1, size=resolution, mode="bilinear", align_corners=False)
    flat = (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) + 0.05 * torch.randn(n, 3, resolution, resolution, generator=gen)
    pick = kinds.view(n, 1, 1, 1)
    return torch.where(pick == 0, white, torch.where(pick == 1, blobs, flat)).clamp(-1, 1)


def train_classifier(
    *, resolution: int = 16, seed: int = 0, steps: int = DEFAULT_STEPS, batch: int = DEFAULT_BATCH,
    pool: int = DEFAULT_POOL, lr: float = DEFAULT_LR, noise_max: float = NOISE_MAX,
    outlier_share: float = OUTLIER_SHARE, config: ClassifierConfig | None = None, progress: bool = False,
) -> AttributeClassifier:
    """Train on the first ``pool`` images of the TRAIN stream ``make_batch(seed=seed)``, shuffled
    afresh each epoch, with fresh noise on every draw. Adam with a cosine decay to zero; the loss
    is the sum of the per-attribute cross-entropies, plus the outlier-exposure term (see
    ``OUTLIER_SHARE``). Returns the classifier in eval mode.

    A fixed pool, not a fresh window per step: rendering costs more than a training step on
    this CPU, and 24k distinct images with fresh noise each epoch reached the same held-out
    accuracy as an endless stream."""
    if steps < 1 or batch < 1 or pool < batch:
        raise ValueError(f"steps={steps}, batch={batch}, pool={pool}: steps and batch at least 1, pool at least batch")
    config = config or ClassifierConfig(resolution=resolution)
    if config.resolution != resolution:
        raise ValueError(f"config resolution {config.resolution} != resolution {resolution}")
    clf = build_classifier(seed, config).train()
    data = make_batch(pool, seed=seed, split="train", resolution=resolution)
    images = data.images
    targets = attribute_targets(data.attributes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)  # order and noise; not the global RNG
    per_epoch = pool // batch
    n_out = int(round(outlier_share * batch))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="classifier", unit="step")
    try:
        order = torch.randperm(pool, generator=gen)
        for step in range(steps):
            if step and step % per_epoch == 0:
                order = torch.randperm(pool, generator=gen)
            idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
            x = images[idx].float().div(127.5).sub(1.0)
            if noise_max > 0:
                sigma = torch.rand(batch, 1, 1, 1, generator=gen) * noise_max
                x = x + sigma * torch.randn(x.shape, generator=gen)
            if n_out:
                x = torch.cat([x, outlier_images(n_out, resolution, gen)])
            logits = clf(x)
            loss = sum(F.cross_entropy(logits[n][:batch], targets[n][idx]) for n in ATTRIBUTE_NAMES)
            if n_out:
                # Cross-entropy against the uniform distribution, per head.
                loss = loss + OUTLIER_WEIGHT * sum(-F.log_softmax(logits[n][batch:], 1).mean() for n in ATTRIBUTE_NAMES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
    finally:
        if bar is not None:
            bar.close()
    return clf.eval()


@torch.no_grad()
def heldout_accuracy(clf: AttributeClassifier, *, resolution: int | None = None, n: int = 2000, seed: int = 1234, chunk: int = 500) -> Dict[str, float]:
    """Per-attribute accuracy on ``n`` clean images of the HELDOUT split (combinations training
    never saw). The seed is another stream than training's, though the split already keeps
    every held-out image out of training whatever the seeds."""
    resolution = resolution or clf.config.resolution
    if resolution != clf.config.resolution:
        raise ValueError(f"resolution={resolution}: this classifier was trained at {clf.config.resolution}")
    clf.eval()
    correct = {name: 0 for name in ATTRIBUTE_NAMES}
    for start in range(0, n, chunk):
        data = make_batch(min(chunk, n - start), seed=seed, split="heldout", resolution=resolution, start=start)
        logits = clf(data.floats())
        targets = attribute_targets(data.attributes)
        for name in ATTRIBUTE_NAMES:
            correct[name] += int((logits[name].argmax(1) == targets[name]).sum())
    return {name: correct[name] / n for name in ATTRIBUTE_NAMES}


def save_classifier(clf: AttributeClassifier, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the weights (fp32) and the config (metadata) through the streaming writer; atomic."""
    tensors = {k: v.detach().float().contiguous() for k, v in clf.state_dict().items()}
    meta = {METADATA_KEY: clf.config.to_json()}
    writer = SafetensorsWriter(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], meta, overwrite=overwrite)
    try:
        for key, t in tensors.items():
            writer.write(key, t)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def load_classifier(path: str | os.PathLike[str]) -> AttributeClassifier:
    """An ``AttributeClassifier`` (eval) from a file written by ``save_classifier``."""
    with open_checkpoint(path) as reader:
        text = (reader.metadata or {}).get(METADATA_KEY)
        if not text:
            raise ValueError(f"{path}: not a toy classifier (no {METADATA_KEY!r} metadata)")
        clf = AttributeClassifier(ClassifierConfig.from_json(text))
        expected = clf.state_dict()
        keys = set(reader.keys())
        if keys != set(expected):
            missing = sorted(set(expected) - keys) or sorted(keys - set(expected))
            raise ValueError(f"{path}: keys do not match the classifier's config, e.g. {missing[0]!r}")
        load_checked_state(clf, reader, path, "the config")
    return clf.eval()
