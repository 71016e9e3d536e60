"""Saliency-adaptive noise fusion (SANF) from Face-diffuser (Wang et al., arXiv 2311.10329).

Instead of adding guidance terms, each latent element takes the term that is locally more
salient. Saliency is the 3×3 (σ = 1) Gaussian-blurred magnitude, normalised by a softmax over the
spatial positions of each (image, channel), as in the Face-diffuser reference and pamparamm's
``snf`` mode. incantations softmaxes across the latent channels instead; we do not follow it.
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
