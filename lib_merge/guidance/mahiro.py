"""MaHiRo guidance (reForge ``extensions-builtin/mahiro_reforge``; ComfyUI ``comfy_extras/nodes_mahiro.py``).

No paper. It pulls the CFG result towards the "naive leap" w·D_c, the more so the less the
signed-square-root uncond leap points where the average of leap and CFG result points:
``sim`` = mean over all (image, row, column) of the channel cosine of ŝ(w·D_u) and
ŝ((w·D_c + D)/2) with ŝ(t) = sign(t)·√|t|; ``λ = (1 + sim)/2``; ``D' = λ·D + (1 − λ)·w·D_c``.
Like the reference, the mean runs over the whole batch, so images of a batch influence each other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _signed_sqrt(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sqrt() * t.sign()


def mahiro(d_guided: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """D' = λ·D + (1 − λ)·w·D_c with λ = (1 + sim)/2 (MaHiRo, reference's ``mahiro_normd``)."""
    leap = d_cond * scale
    merge = (leap + d_guided) / 2
    sim = F.cosine_similarity(_signed_sqrt(d_uncond * scale), _signed_sqrt(merge), dim=1).mean()
    weight = (1 + sim) / 2
    return weight * d_guided + (1 - weight) * leap
