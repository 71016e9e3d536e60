"""Saliency-adaptive noise fusion (SANF) from Face-diffuser (Wang et al., arXiv 2311.10329).

Instead of adding guidance terms, each latent element takes the term that is locally more
salient. Saliency is the smoothed magnitude normalised by a softmax over the H·W positions of
each (image, channel): the axis of the paper authors' code (CodeGoat24/Face-diffuser,
``pipeline.py``: ``Softmax(dim=1)`` on a (n·c, h·w) view) and of pamparamm's ``snf`` mode.
incantations softmaxes across the 4 latent channels instead; we do not follow it, because that
compares channels at one position rather than positions within one map as the paper does.

Where we still differ from the authors' code, on purpose: it smooths with a 4×4 average pool
resized back to 64×64 (tied to SD1.5 at 512 px) and then averages the 4 channels, so one choice
is made per position; we smooth with a 3×3 σ = 1 Gaussian and choose per element, as
incantations and pamparamm do, which works at any latent size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import BadParameterError
from .seg import gaussian_kernel_1d


def saliency(term: torch.Tensor) -> torch.Tensor:
    """softmax over H·W of blur₃ₓ₃,σ=1(|g|) per (image, channel) (Face-diffuser arXiv 2311.10329 SANF)."""
    b, c, h, w = term.shape
    magnitude = term.abs().float()
    k1 = gaussian_kernel_1d(1.0, 3, device=term.device)
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, 3, 3)
    # Reflect padding needs 2 pixels per axis; tiny maps fall back to edge replication.
    mode = "reflect" if min(h, w) > 1 else "replicate"
    blurred = F.conv2d(F.pad(magnitude, (1, 1, 1, 1), mode=mode), kernel, groups=c)
    return torch.softmax(blurred.reshape(b * c, h * w), dim=1).reshape(b, c, h, w)


def sanf_fuse(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per element, the guidance term with the highest normalised saliency; ties go to the earlier term (arXiv 2311.10329)."""
    if len(terms) == 0:
        raise BadParameterError("sanf_fuse needs at least one guidance term")
    if len(terms) == 1:
        return terms[0]
    stacked = torch.stack(list(terms))
    choice = torch.stack([saliency(t) for t in terms]).argmax(dim=0, keepdim=True)
    return torch.gather(stacked, 0, choice).squeeze(0)
