"""The settings of the Untitled & Guidance script: one immutable record, shared by the math, the
host adapters, the UI, the infotext and the API.

Field names are the public API names (``alwayson_scripts`` dict keys, ``p.untitled_guidance_<name>``
attributes set by X/Y/Z axes). Every method is off by default, so a default record changes nothing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import BadParameterError
from .apg import APG_FORMS
from .cfg_zero import CFG_ZERO_FORMS
from .skimmed import SKIMMED_MODES

UNTITLED_MODES = ("off", "empty", "zero", "gibberish")
DYNTHRES_SCHEDULES = (
    "Constant",
    "Linear Down",
    "Cosine Down",
    "Half Cosine Down",
    "Linear Up",
    "Cosine Up",
    "Half Cosine Up",
    "Power Up",
    "Power Down",
    "Linear Repeating",
    "Cosine Repeating",
    "Sawtooth",
)
DYNTHRES_STARTPOINTS = ("MEAN", "ZERO")
DYNTHRES_MEASURES = ("AD", "STD")

# The alternative combiners (field prefix -> label for messages): each replaces D_u + w·Δ.
COMBINER_LABELS = {
    "apg": "APG",
    "cfgzero": "CFG-Zero*",
    "tcfg": "TCFG",
    "mahiro": "MaHiRo",
    "skimmed": "Skimmed CFG",
    "fdg": "FDG",
}
COMBINERS = tuple(COMBINER_LABELS)

# Sentinel end of a step window meaning "to the last step" (incantations writes 2048).
TO_THE_END = 2048.0


@dataclass(frozen=True)
class GuidanceSettings:
    """All knobs. Windows (``*_start``/``*_end``): a value < 1 with a fractional part, or exactly
    1.0 given as a float, is a fraction of the sampling steps; any other value is a 0-based step
    index; both ends inclusive; values >= steps mean "to the end". ``*_hires`` says whether the
    method also runs in the hires-fix pass."""

    # untitled: sample with no prompt at all
    untitled: str = "off"  # off | empty | zero | gibberish

    # CFG++ (arXiv 2406.08070): lambda in [0, 1]; 0 = off
    cfgpp: float = 0.0
    cfgpp_hires: bool = True

    # Perturbed-Attention Guidance (arXiv 2403.17377); scale 0 = off
    pag_scale: float = 0.0
    pag_sanf: bool = False
    pag_start: float = 0.0
    pag_end: float = TO_THE_END
    pag_layers: str = "M00"
    pag_hires: bool = True

    # Smoothed Energy Guidance (arXiv 2408.00760); scale 0 = off; sigma in feature pixels, inf allowed
    seg_scale: float = 0.0
    seg_sigma: float = math.inf
    seg_start: float = 0.0
    seg_end: float = TO_THE_END
    seg_layers: str = "M00"
    seg_hires: bool = True

    # FreeU (arXiv 2309.11497)
    freeu_enabled: bool = False
    freeu_version: int = 2
    freeu_b1: float = 1.3
    freeu_b2: float = 1.4
    freeu_s1: float = 0.9
    freeu_s2: float = 0.2
    freeu_start: float = 0.0
    freeu_end: float = 1.0
    freeu_hires: bool = True

    # CFG rescale (Lin et al., arXiv 2305.08891 sec. 3.4); phi 0 = off
    rescale_phi: float = 0.0
    rescale_hires: bool = True

    # Dynamic thresholding (mcmonkey's sd-dynamic-thresholding semantics)
    dynthres_enabled: bool = False
    dynthres_mimic_scale: float = 7.0
    dynthres_threshold_percentile: float = 100.0
    dynthres_mimic_mode: str = "Constant"
    dynthres_mimic_scale_min: float = 0.0
    dynthres_cfg_mode: str = "Constant"
    dynthres_cfg_scale_min: float = 0.0
    dynthres_sched_val: float = 4.0
    dynthres_separate_feature_channels: bool = True
    dynthres_scaling_startpoint: str = "MEAN"
    dynthres_variability_measure: str = "AD"
    dynthres_interpolate_phi: float = 1.0
    dynthres_hires: bool = True

    # -- alternative combiners: each replaces D_u + w·Δ; at most one may be on (COMBINERS) -------
    # APG (arXiv 2410.02416): η, norm threshold r (0 = no clip), momentum β (< 0: the paper's reverse momentum)
    apg_enabled: bool = False
    apg_eta: float = 0.0
    apg_norm_threshold: float = 5.0
    apg_momentum: float = -0.5
    apg_form: str = "paper"  # paper: D_c + (w−1)·g' | comfyui: D_c + w·g'
    apg_hires: bool = True

    # CFG-Zero* (arXiv 2503.18886): optimized scale s*, and the first K sampler steps output D = x
    cfgzero_enabled: bool = False
    cfgzero_optimized_scale: bool = True
    cfgzero_zero_init_steps: int = 0
    cfgzero_form: str = "paper"  # paper (noise space) | comfyui (s* applied to the denoised D_u)
    cfgzero_hires: bool = True

    # TCFG (arXiv 2503.18137): no parameters
    tcfg_enabled: bool = False
    tcfg_hires: bool = True

    # MaHiRo (reForge / ComfyUI built-in): no parameters
    mahiro_enabled: bool = False
    mahiro_hires: bool = True

    # Skimmed CFG (Extraltodeus): skimming scale k, used where the guidance would "burn"
    skimmed_enabled: bool = False
    skimmed_scale: float = 7.0
    skimmed_mode: str = "skim"  # skim (main node) | linear (lin-interp node)
    skimmed_full_negative: bool = False
    skimmed_flipping_filter: bool = True
    skimmed_hires: bool = True

    # FDG (arXiv 2506.19713): the CFG scale guides the low band, fdg_high_scale the high band
    fdg_enabled: bool = False
    fdg_high_scale: float = 12.0
    fdg_hires: bool = True

    # -- stacked on any combiner ---------------------------------------------------------------
    # NAG (arXiv 2505.21179): φ (0 = off, 1 = no change), τ, α; cross-attention of the cond rows
    nag_scale: float = 0.0
    nag_tau: float = 2.5
    nag_alpha: float = 0.25
    nag_layers: str = "all"
    nag_start: float = 0.0
    nag_end: float = TO_THE_END
    nag_hires: bool = True

    # CFG interval (arXiv 2404.07724): guidance only for σ in (low, high]; 0 / inf leave a side open
    cfg_interval: bool = False
    cfg_interval_low: float = 0.28
    cfg_interval_high: float = 5.42
    cfg_interval_hires: bool = True

    def __post_init__(self) -> None:
        _choice("untitled", self.untitled, UNTITLED_MODES)
        _range("cfgpp", self.cfgpp, 0.0, 1.0)
        _range("pag_scale", self.pag_scale, 0.0, 100.0)
        _range("seg_scale", self.seg_scale, 0.0, 100.0)
        if not (self.seg_sigma > 0):
            raise BadParameterError(f"seg_sigma={self.seg_sigma!r}: must be > 0 (inf = spatial mean)")
        _choice("freeu_version", self.freeu_version, (1, 2))
        _range("rescale_phi", self.rescale_phi, 0.0, 1.0)
        _range("dynthres_threshold_percentile", self.dynthres_threshold_percentile, 0.0, 100.0)
        _range("dynthres_interpolate_phi", self.dynthres_interpolate_phi, 0.0, 1.0)
        _choice("dynthres_mimic_mode", self.dynthres_mimic_mode, DYNTHRES_SCHEDULES)
        _choice("dynthres_cfg_mode", self.dynthres_cfg_mode, DYNTHRES_SCHEDULES)
        _choice("dynthres_scaling_startpoint", self.dynthres_scaling_startpoint, DYNTHRES_STARTPOINTS)
        _choice("dynthres_variability_measure", self.dynthres_variability_measure, DYNTHRES_MEASURES)
        for name in ("pag_start", "pag_end", "seg_start", "seg_end", "freeu_start", "freeu_end", "nag_start", "nag_end"):
            if getattr(self, name) < 0:
                raise BadParameterError(f"{name}={getattr(self, name)!r}: a window bound must be >= 0")
        _range("apg_eta", self.apg_eta, -10.0, 10.0)
        _range("apg_norm_threshold", self.apg_norm_threshold, 0.0, 50.0)
        _range("apg_momentum", self.apg_momentum, -5.0, 1.0)
        _choice("apg_form", self.apg_form, APG_FORMS)
        _range("cfgzero_zero_init_steps", self.cfgzero_zero_init_steps, 0, 1000)
        _choice("cfgzero_form", self.cfgzero_form, CFG_ZERO_FORMS)
        _range("skimmed_scale", self.skimmed_scale, 0.0, 10.0)
        _choice("skimmed_mode", self.skimmed_mode, SKIMMED_MODES)
        _range("fdg_high_scale", self.fdg_high_scale, 0.0, 100.0)
        _range("nag_scale", self.nag_scale, 0.0, 50.0)
        _range("nag_tau", self.nag_tau, 1.0, 10.0)
        _range("nag_alpha", self.nag_alpha, 0.0, 1.0)
        _range("cfg_interval_low", self.cfg_interval_low, 0.0, math.inf)
        _range("cfg_interval_high", self.cfg_interval_high, 0.0, math.inf)
        if not self.cfg_interval_low < self.cfg_interval_high:
            raise BadParameterError(
                f"cfg_interval_low={self.cfg_interval_low!r}, cfg_interval_high={self.cfg_interval_high!r}: low must be below high"
            )
        message = self.conflict()
        if message:
            raise BadParameterError(message)

    def conflict(self) -> str | None:
        """The one message for methods that cannot run together, or None (composition rules)."""
        combiners = self.combiners_on
        if len(combiners) > 1:
            return (f"{' and '.join(combiners)} each replace the CFG combine; turn on only one of "
                    f"{', '.join(COMBINER_LABELS.values())}")
        if self.cfgpp_on and combiners:
            return f"CFG++ and {combiners[0]} both replace the CFG combine; turn one off"
        if self.cfgpp_on and self.cfg_interval:
            return "CFG++ and the CFG interval cannot be combined: CFG++ has no scale that means 'no guidance'; turn one off"
        return None

    # -- which methods are on -------------------------------------------------------------------
    @property
    def pag_on(self) -> bool:
        return self.pag_scale > 0

    @property
    def seg_on(self) -> bool:
        return self.seg_scale > 0

    @property
    def cfgpp_on(self) -> bool:
        return self.cfgpp > 0

    @property
    def rescale_on(self) -> bool:
        return self.rescale_phi > 0

    @property
    def nag_on(self) -> bool:
        return self.nag_scale > 0

    @property
    def combiners_on(self) -> tuple[str, ...]:
        """Labels of the alternative combiners switched on (at most one in a valid record)."""
        return tuple(label for name, label in COMBINER_LABELS.items() if getattr(self, f"{name}_enabled"))

    @property
    def combiner(self) -> str:
        """Name of the combiner in use ("cfg" when none of COMBINERS is on)."""
        on = [name for name in COMBINER_LABELS if getattr(self, f"{name}_enabled")]
        return on[0] if on else "cfg"

    @property
    def any_on(self) -> bool:
        return (
            self.untitled != "off"
            or self.cfgpp_on
            or self.pag_on
            or self.seg_on
            or self.freeu_enabled
            or self.rescale_on
            or self.dynthres_enabled
            or bool(self.combiners_on)
            or self.nag_on
            or self.cfg_interval
        )

    def replace(self, **changes: Any) -> "GuidanceSettings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "GuidanceSettings":
        """Build from a dict by parameter name (API). Unknown names are an error listing valid ones;
        values are coerced to each field's type ("true"/"false" strings accepted for booleans)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BadParameterError(
                f"unknown Untitled Guidance parameter(s) {', '.join(unknown)}; valid names: {', '.join(known)}"
            )
        kwargs = {name: coerce(name, known[name].default, value) for name, value in values.items()}
        return cls(**kwargs)


def coerce(name: str, default: Any, value: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` with an error that names the parameter."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            return int(as_float)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise BadParameterError(
            f"{name}={value!r}: expected {type(default).__name__} like {default!r}"
        ) from None


def _range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise BadParameterError(f"{name}={value!r}: must be within [{low}, {high}]")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise BadParameterError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
