"""The alternative combiners: each replaces CFG's ``D = D_u + w·Δ`` for one sampling pass.

APG, CFG-Zero*, TCFG, Skimmed CFG, MaHiRo and FDG all take the same inputs (x, D_c, D_u, w) and
return the guided D in place of plain CFG, so exactly one may run (``GuidanceSettings.conflict``
says so in one message). Stacked terms (PAG, SEG), dynamic thresholding and CFG rescale then act
on their result as on plain CFG. With ``AND`` sub-prompts D_c is the effective cond
``D_u + Σ_k α_k (D_c,k − D_u)`` (exact for one sub-prompt of weight 1).

Who reads D_u (``reads_uncond``): at w = 1 every combiner returns D_c (no guidance asked for),
except FDG, whose high band keeps its own scale; a CFG-Zero* zero-init step returns x and reads
nothing.
"""
from __future__ import annotations

import torch

from .apg import ApgMomentum, apg_combine
from .cfg_zero import cfg_zero_star
from .fdg import fdg_combine
from .mahiro import mahiro
from .settings import COMBINER_LABELS, GuidanceSettings
from .skimmed import skimmed_combine
from .tcfg import tcfg_combine

LABELS = {"cfg": "CFG", **COMBINER_LABELS}


def reads_uncond(combiner: str, scale: float, settings: GuidanceSettings) -> bool:
    """Whether ``combiner`` at CFG scale ``scale`` needs D_u."""
    if combiner == "fdg":
        return scale != 1.0 or settings.fdg_high_scale != 1.0
    return scale != 1.0


def combine_predictions(
    combiner: str,
    settings: GuidanceSettings,
    *,
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    step: int,
    momentum: ApgMomentum | None = None,
) -> torch.Tensor:
    """The guided D of ``combiner`` (one of "cfg" and ``COMBINERS``) for one model call of ``step``."""
    s = settings
    if combiner == "fdg":
        return fdg_combine(d_cond, d_uncond, scale, s.fdg_high_scale)
    if scale == 1.0 and combiner != "apg":
        return d_cond
    if combiner == "cfg":
        return d_uncond + scale * (d_cond - d_uncond)
    if combiner == "apg":
        previous = momentum.previous(step, d_cond) if momentum is not None and s.apg_momentum else None
        guided, buffer = apg_combine(d_cond, d_uncond, scale, eta=s.apg_eta, norm_threshold=s.apg_norm_threshold,
                                     momentum=s.apg_momentum, previous=previous, form=s.apg_form)
        if momentum is not None and s.apg_momentum:
            momentum.record(step, buffer)
        return guided
    if combiner == "cfgzero":
        return cfg_zero_star(x, d_cond, d_uncond, scale, form=s.cfgzero_form, optimized=s.cfgzero_optimized_scale)
    if combiner == "tcfg":
        return tcfg_combine(x, d_cond, d_uncond, scale)
    if combiner == "mahiro":
        return mahiro(d_uncond + scale * (d_cond - d_uncond), d_cond, d_uncond, scale)
    if combiner == "skimmed":
        return skimmed_combine(x, d_cond, d_uncond, scale, s.skimmed_scale, mode=s.skimmed_mode,
                               full_skim_negative=s.skimmed_full_negative, flipping_filter=s.skimmed_flipping_filter)
    raise ValueError(f"unknown combiner {combiner!r}")
