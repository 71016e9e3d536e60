"""Skimmed CFG (Extraltodeus/Skimmed_CFG ``skimmed_CFG.py``, read at 02594ff6): "anti-burn" at high CFG.

No paper. Element-wise, where the guidance pushes a value further out in the direction it
already has, the CFG scale there is brought down to the skimming scale k. With
``d = b + s·(a − b)`` the mask of the pair (a, b) is

    M(a, b, s) = [sign(a − b) = sign(a)] ∧ [sign(a) = sign(s·a − (s − 1)·b)] ∧ [sign(d) = sign(d − x)]

(the last term is the "flipping filter"). Main node ("skim"): on M(D_u, D_c, w),
``D_u ← D_u − ((w − k_u)/w)·(D_u − D_c)`` (k_u = 0 with ``full_skim_negative``, else k); then on
M(D_c, D_u', w), ``D_c ← D_c − ((w − k)/w)·(D_c − D_u')``; then plain CFG, which gives scale k on
the masked elements. "Linear" (the README's recommendation): f = (k − 1)/(w − 1), on M(D_c, D_u, w)
and then on M(D_u', D_c, w), ``D_u ← (1 − f)·D_c + f·D_u``. At w ≤ 1 both leave the predictions
alone (the reference skips itself at CFG 1, where its uncond is zeros).
"""
from __future__ import annotations

import torch

from ..errors import BadParameterError

SKIMMED_MODES = ("skim", "linear")


def skimming_mask(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, flipping_filter: bool = True) -> torch.Tensor:
    """M(a, b, s) of the module docstring (the reference's ``get_skimming_mask`` with a = its "cond")."""
    guided = b + scale * (a - b)
    mask = ((a - b).sign() == a.sign()) & (a.sign() == (a * scale - b * (scale - 1)).sign())
    if flipping_filter:
        mask &= guided.sign() == (guided - x).sign()
    return mask


def _skim(x, a, b, scale, k, flipping_filter):
    mask = skimming_mask(x, a, b, scale, flipping_filter)
    return torch.where(mask, a - ((scale - k) / scale) * (a - b), a)


def skimmed_predictions(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    skim_scale: float,
    *,
    mode: str = "skim",
    full_skim_negative: bool = False,
    flipping_filter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_c', D_u') to feed plain CFG at ``scale`` (Skimmed CFG main node or its linear variant)."""
    if mode not in SKIMMED_MODES:
        raise BadParameterError(f"skimmed_mode={mode!r}: choose one of {', '.join(SKIMMED_MODES)}")
    if scale <= 1.0:
        return d_cond, d_uncond
    if mode == "skim":
        d_uncond = _skim(x, d_uncond, d_cond, scale, 0.0 if full_skim_negative else skim_scale, flipping_filter)
        d_cond = _skim(x, d_cond, d_uncond, scale, skim_scale, flipping_filter)
        return d_cond, d_uncond
    f = (skim_scale - 1.0) / (scale - 1.0)
    for first_is_cond in (True, False):
        a, b = (d_cond, d_uncond) if first_is_cond else (d_uncond, d_cond)
        mask = skimming_mask(x, a, b, scale)
        d_uncond = torch.where(mask, d_cond * (1 - f) + d_uncond * f, d_uncond)
    return d_cond, d_uncond


def skimmed_combine(x, d_cond, d_uncond, scale, skim_scale, **options) -> torch.Tensor:
    """D = D_u' + w·(D_c' − D_u') with the skimmed predictions."""
    c, u = skimmed_predictions(x, d_cond, d_uncond, scale, skim_scale, **options)
    return u + scale * (c - u)
