"""Scores for toy-model samples, all read through the attribute classifier of ``classifier``.

These are *analogues* of the metrics the papers report, built for images whose ground truth is
known; they are not Image Reward, TIFA or FID, and their numbers are not comparable with those:

* ``prompt_adherence`` — the share of samples whose predicted attributes all equal the prompt's
  (our TIFA analogue: TIFA asks a VQA model questions about the prompt; here the "questions" are
  the attribute heads of a classifier trained on the generator's ground truth).
* ``frechet_distance`` of classifier features — the Fréchet distance between Gaussians fitted to
  the penultimate features of samples and of held-out real images (our FID analogue: FID uses
  Inception-v3 pool features of natural images; ours are 64-dimensional and specific to the toy
  data, so only distances computed with the same classifier and the same sample count compare).
* ``untitled_yield`` — the share of no-prompt samples the classifier recognises confidently.
* ``neighbour_correlation`` — a pixel statistic with no classifier: is this picture noise?

Images may be uint8 (0..255, as ``make_batch`` returns) or float in [-1, 1] (the model's
range; values outside are clipped, non-finite values read as grey, which no head recognises).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import torch

from .classifier import AttributeClassifier
from .data import ATTRIBUTE_NAMES, VALUES, Attributes, make_batch, parse_caption

# A sample counts as content when the classifier gives at least this probability to one value on
# every listed attribute. Measured with the default classifier (docs/toy.md, "Metrics"): 95 % of
# clean held-out images pass on shape + colour, 0 % of white noise, smooth colour blobs or grey
# fields, and about half of 50/50 blends of two images (two shapes at once is not a clean
# picture). 0.99 would reject a fifth of the real images; 0.7 passes three quarters of blends.
UNTITLED_THRESHOLD = 0.9

_CHUNK = 512  # images per classifier call: bounds memory for large sample sets

Images = torch.Tensor


def as_input(images: Images) -> torch.Tensor:
    """Images as the classifier reads them: float32 (N, 3, R, R) in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, 3, R, R) or (3, R, R)")
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1.0)
    if not x.is_floating_point():
        raise ValueError(f"images of dtype {x.dtype}: use uint8 (0..255) or float in [-1, 1]")
    return torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)


@torch.no_grad()
def _probabilities(clf: AttributeClassifier, images: Images) -> Dict[str, torch.Tensor]:
    x = as_input(images)
    clf.eval()
    parts: Dict[str, List[torch.Tensor]] = {name: [] for name in ATTRIBUTE_NAMES}
    for start in range(0, x.shape[0], _CHUNK):
        logits = clf(x[start:start + _CHUNK])
        for name in ATTRIBUTE_NAMES:
            parts[name].append(torch.softmax(logits[name].double(), dim=1))
    if x.shape[0] == 0:
        return {name: torch.zeros(0, len(VALUES[name]), dtype=torch.float64) for name in ATTRIBUTE_NAMES}
    return {name: torch.cat(p) for name, p in parts.items()}


def predict(clf: AttributeClassifier, images: Images) -> List[Dict[str, Tuple[str, float]]]:
    """Per image, ``{attribute: (predicted value, its probability)}`` for every attribute."""
    probs = _probabilities(clf, images)
    best = {name: p.max(dim=1) for name, p in probs.items()}
    n = next(iter(probs.values())).shape[0]
    return [
        {name: (VALUES[name][int(best[name].indices[i])], float(best[name].values[i])) for name in ATTRIBUTE_NAMES}
        for i in range(n)
    ]


def _check_attributes(attributes: Sequence[str]) -> Tuple[str, ...]:
    names = tuple(attributes)
    unknown = [a for a in names if a not in ATTRIBUTE_NAMES]
    if not names or unknown:
        raise ValueError(f"attributes {list(names)}: choose one or more of {', '.join(ATTRIBUTE_NAMES)}")
    return names


@dataclass(frozen=True)
class AdherenceResult:
    rate: float  # share of samples whose predicted attributes all match the prompt's
    per_attribute: Dict[str, float]  # match rate of each counted attribute alone
    n: int
    attributes: Tuple[str, ...]
    matched: Tuple[bool, ...]  # per sample, in input order

    @property
    def chance(self) -> float:
        """``rate`` of a classifier that guesses uniformly: the floor a model must beat."""
        return math.prod(1.0 / len(VALUES[a]) for a in self.attributes)

    def stderr(self) -> float:
        """Binomial standard error of ``rate`` over these ``n`` samples."""
        return math.sqrt(self.rate * (1 - self.rate) / self.n) if self.n else float("nan")


def prompt_adherence(
    clf: AttributeClassifier, images: Images, wanted: Sequence[Union[Attributes, str]],
    attributes: Sequence[str] = ATTRIBUTE_NAMES,
) -> AdherenceResult:
    """How often samples show what their prompts asked for (our TIFA analogue, not TIFA).

    ``wanted[i]`` is the prompt of ``images[i]``, as ``Attributes`` or a caption; only the
    ``attributes`` listed count (e.g. ``("shape", "colour", "texture")`` when the prompts name
    only those)."""
    names = _check_attributes(attributes)
    targets = [parse_caption(w) if isinstance(w, str) else w for w in wanted]
    probs = _probabilities(clf, images)
    n = next(iter(probs.values())).shape[0]
    if len(targets) != n:
        raise ValueError(f"{n} images but {len(targets)} prompts: give one prompt per image")
    if n == 0:
        raise ValueError("no images to score")
    hits = {}
    for name in names:
        predicted = probs[name].argmax(dim=1)
        wanted_idx = torch.tensor([VALUES[name].index(getattr(t, name)) for t in targets])
        hits[name] = predicted == wanted_idx
    all_hit = torch.stack([hits[name] for name in names]).all(dim=0)
    return AdherenceResult(
        rate=float(all_hit.double().mean()),
        per_attribute={name: float(hits[name].double().mean()) for name in names},
        n=n, attributes=names, matched=tuple(bool(v) for v in all_hit),
    )


def untitled_yield(
    clf: AttributeClassifier, images: Images, threshold: float = UNTITLED_THRESHOLD,
    attributes: Sequence[str] = ("shape", "colour"),
) -> float:
    """Share of (no-prompt) samples the classifier recognises: probability ≥ ``threshold`` for
    one value of every listed attribute (the seed's "legit content 2 times in 10", as an
    analogue). Which value does not matter: no prompt asked for one."""
    names = _check_attributes(attributes)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}: between 0 and 1")
    probs = _probabilities(clf, images)
    n = next(iter(probs.values())).shape[0]
    if n == 0:
        raise ValueError("no images to score")
    sure = torch.stack([probs[name].max(dim=1).values >= threshold for name in names]).all(dim=0)
    return float(sure.double().mean())


@torch.no_grad()
def features(clf: AttributeClassifier, images: Images) -> torch.Tensor:
    """(N, D) penultimate classifier features of any images (samples or real), float64."""
    x = as_input(images)
    clf.eval()
    chunks = [clf.features(x[s:s + _CHUNK]).double() for s in range(0, x.shape[0], _CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, clf.config.features, dtype=torch.float64)


def reference_features(clf: AttributeClassifier, resolution: int, n: int, seed: int) -> torch.Tensor:
    """Features of ``n`` held-out real images (stream ``seed``): the reference a sample set's
    Fréchet distance is measured against."""
    parts = [
        features(clf, make_batch(min(_CHUNK, n - s), seed=seed, split="heldout", resolution=resolution, start=s).images)
        for s in range(0, n, _CHUNK)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, clf.config.features, dtype=torch.float64)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (our FID analogue):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½).

    Computed in float64 with no scipy: tr (Σa Σb)^½ equals tr (√Σa Σb √Σa)^½, whose argument is
    symmetric positive semi-definite, so both roots come from ``eigh`` (eigenvalues clipped at
    zero against rounding) rather than a general matrix square root that can turn complex. The
    estimate is biased upward for few samples; compare only distances with equal sample counts."""
    a, b = (torch.as_tensor(f).detach().double() for f in (features_a, features_b))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets of shapes {tuple(a.shape)} and {tuple(b.shape)}: need (N, D) and (M, D)")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"{a.shape[0]} and {b.shape[0]} samples: a covariance needs at least 2 each")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric in exact arithmetic; remove rounding asymmetry
    tr_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0.0).sqrt().sum()
    value = float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)
    return max(value, 0.0)  # a true distance is ≥ 0; rounding can leave -1e-12


def neighbour_correlation(images: Images) -> float:
    """Mean over images of the correlation between horizontally adjacent pixels (all channels,
    each centred on its own mean). About 0 for white noise, near 1 for pictures made of flat
    regions. Images with no variation at all are left out (their correlation is undefined);
    if no image varies the result is NaN, which fails any comparison."""
    x = as_input(images).double()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    left, right = x[..., :, :-1], x[..., :, 1:]
    num = (left * right).sum(dim=(1, 2, 3))
    den = (left.pow(2).sum(dim=(1, 2, 3)) * right.pow(2).sum(dim=(1, 2, 3))).sqrt()
    varied = den > 1e-12
    if not bool(varied.any()):
        return float("nan")
    return float((num[varied] / den[varied]).mean())
