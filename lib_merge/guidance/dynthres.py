"""Dynamic thresholding ("CFG scale fix"), with the semantics of mcmonkey's sd-dynamic-thresholding.

It lets a high CFG scale keep the value spread of a lower "mimic" scale: both scales are
scheduled over the run, the guided result is recentred, its spread is measured (max abs
deviation with a percentile, or std) and rescaled to the mimic target's spread, then blended
with the raw result. Everything happens in D (x0) space, as in every host.

Differences from the reference, on purpose: a one-step run does not divide by zero when
scheduling (the schedule position is 0), and where the guided result has no spread at all the
scaling factor is 1 instead of a division by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BadParameterError
from .settings import DYNTHRES_MEASURES, DYNTHRES_SCHEDULES, DYNTHRES_STARTPOINTS
from .window import progress


def _schedule_shape(mode: str, f: float, v: float) -> float:
    if mode == "Constant":
        return 1.0
    if mode == "Linear Down":
        return 1.0 - f
    if mode == "Cosine Down":
        return math.cos(f * math.pi / 2)
    if mode == "Half Cosine Down":
        return math.cos(f)
    if mode == "Linear Up":
        return f
    if mode == "Cosine Up":
        return 1.0 - math.cos(f * math.pi / 2)
    if mode == "Half Cosine Up":
        return 1.0 - math.cos(f)
    if mode == "Power Up":
        return math.pow(f, v)
    if mode == "Power Down":
        return 1.0 - math.pow(f, v)
    if mode == "Linear Repeating":
        # Triangle wave that starts at 1, reaches 0 half way through each period, returns to 1.
        portion = (f * v) % 1.0
        return (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    if mode == "Cosine Repeating":
        return 0.5 + 0.5 * math.cos(2 * math.pi * f * v)
    if mode == "Sawtooth":
        return (f * v) % 1.0
    raise BadParameterError(f"dynamic thresholding schedule {mode!r}: choose one of {', '.join(DYNTHRES_SCHEDULES)}")


def schedule_scale(mode: str, scale: float, minimum: float, step: int, total_steps: int, sched_val: float) -> float:
    """scale' = min + (scale − min)·g(step/(steps−1)) for mcmonkey's 12 schedules (sd-dynamic-thresholding `interpretScale`)."""
    return minimum + (scale - minimum) * _schedule_shape(mode, progress(step, total_steps), sched_val)


@dataclass(frozen=True)
class DynThresholdConfig:
    """The scale-independent options of one dynamic-thresholding run (UI defaults of the A1111 script)."""

    mimic_scale: float = 7.0
    threshold_percentile: float = 100.0  # percent, as the A1111 UI and infotext write it
    mimic_mode: str = "Constant"
    mimic_scale_min: float = 0.0
    cfg_mode: str = "Constant"
    cfg_scale_min: float = 0.0
    sched_val: float = 4.0
    separate_feature_channels: bool = True
    scaling_startpoint: str = "MEAN"
    variability_measure: str = "AD"
    interpolate_phi: float = 1.0

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("mimic_mode", self.mimic_mode, DYNTHRES_SCHEDULES),
            ("cfg_mode", self.cfg_mode, DYNTHRES_SCHEDULES),
            ("scaling_startpoint", self.scaling_startpoint, DYNTHRES_STARTPOINTS),
            ("variability_measure", self.variability_measure, DYNTHRES_MEASURES),
        ):
            if value not in choices:
                raise BadParameterError(f"dynthres_{name}={value!r}: choose one of {', '.join(choices)}")
        if not 0.0 <= self.threshold_percentile <= 100.0:
            raise BadParameterError(f"dynthres_threshold_percentile={self.threshold_percentile!r}: must be within [0, 100]")
        if not 0.0 <= self.interpolate_phi <= 1.0:
            raise BadParameterError(f"dynthres_interpolate_phi={self.interpolate_phi!r}: must be within [0, 1]")

    @classmethod
    def from_settings(cls, settings) -> DynThresholdConfig:
        return cls(**{name: getattr(settings, "dynthres_" + name) for name in cls.__dataclass_fields__})

    def scales(self, cfg_scale: float, step: int, total_steps: int) -> tuple[float, float]:
        """(scheduled CFG scale, scheduled mimic scale) at ``step``."""
        w = schedule_scale(self.cfg_mode, cfg_scale, self.cfg_scale_min, step, total_steps, self.sched_val)
        m = schedule_scale(self.mimic_mode, self.mimic_scale, self.mimic_scale_min, step, total_steps, self.sched_val)
        return w, m


def _quantile(t: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """Linear-interpolated quantile like ``torch.quantile``, which refuses inputs over 2**24 elements."""
    ordered = t.sort(dim=dim).values
    pos = q * (t.shape[dim] - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    hi = min(lo + 1, t.shape[dim] - 1)
    low = ordered.narrow(dim, lo, 1)
    return low + (ordered.narrow(dim, hi, 1) - low) * frac


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(num))


def dynamic_threshold(
    t_cfg: torch.Tensor,
    t_mimic: torch.Tensor,
    config: DynThresholdConfig,
) -> torch.Tensor:
    """Rescale the CFG target's spread to the mimic's: mcmonkey `dynthresh` (MEAN/ZERO × AD/STD, φ), after Imagen arXiv 2205.11487."""
    shape = t_cfg.shape
    work = torch.float32 if t_cfg.dtype in (torch.float16, torch.bfloat16) else t_cfg.dtype
    cfg = t_cfg.to(work).flatten(2)
    mim = t_mimic.to(work).flatten(2)
    mu_cfg = cfg.mean(dim=2, keepdim=True)
    c_cfg = cfg - mu_cfg
    c_mim = mim - mim.mean(dim=2, keepdim=True)
    p = config.threshold_percentile / 100.0

    if config.separate_feature_channels:
        if config.variability_measure == "STD":
            r_mim = c_mim.std(dim=2, keepdim=True)
            r_cfg = c_cfg.std(dim=2, keepdim=True)
        else:
            r_mim = c_mim.abs().amax(dim=2, keepdim=True)
            r_cfg = _quantile(c_cfg.abs(), p, dim=2)
    else:
        # One statistic over the whole batch tensor: images of a batch influence each other.
        if config.variability_measure == "STD":
            r_mim = c_mim.std()
            r_cfg = c_cfg.std()
        else:
            r_mim = c_mim.abs().max()
            r_cfg = _quantile(c_cfg.abs().flatten(), p, dim=0).squeeze(0)

    if config.scaling_startpoint == "ZERO":
        result = cfg * _safe_ratio(r_mim, r_cfg)
    elif config.variability_measure == "STD":
        result = mu_cfg + c_cfg * _safe_ratio(r_mim, r_cfg)
    else:
        bound = torch.maximum(r_mim, r_cfg)
        clamped = torch.maximum(torch.minimum(c_cfg, bound), -bound)
        result = mu_cfg + clamped * _safe_ratio(r_mim, bound)

    result = result.unflatten(2, shape[2:])
    phi = config.interpolate_phi
    if phi != 1.0:
        result = phi * result + (1.0 - phi) * t_cfg.to(work)
    return result.to(t_cfg.dtype)
