"""The Untitled Guidance script's controls, and the mapping between control values and settings.

``CONTROLS`` is the one table the other guidance modules read: the gradio layout
(``ui``), API args (``args``), paste (``paste``) and the X/Y/Z axes
(``xyz``). Pure data and pure functions: no gradio or WebUI import, so it runs in tests
and on both hosts.

Names. A *control* is one value the UI passes to the script, in ``CONTROLS`` order (that order is
also the positional ``alwayson_scripts`` args list). Control names are ``GuidanceSettings`` field
names, plus six UI switches: ``cfgpp_enabled``, ``pag_enabled``, ``seg_enabled``,
``rescale_enabled``, ``nag_enabled`` (those methods are on when their scale is > 0; the switch
keeps the slider's value while the method is off) and ``seg_sigma_inf`` (σ = ∞ cannot live on a
slider).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ...errors import BadParameterError
from ...guidance.apg import APG_FORMS
from ...guidance.cfg_zero import CFG_ZERO_FORMS
from ...guidance.settings import (
    COMBINER_LABELS,
    COMBINERS,
    DYNTHRES_MEASURES,
    DYNTHRES_SCHEDULES,
    DYNTHRES_STARTPOINTS,
    TO_THE_END,
    UNTITLED_MODES,
    GuidanceSettings,
    coerce,
)
from ...guidance.skimmed import SKIMMED_MODES


# (switch control, scale field) of the methods switched on by a scale > 0.
SCALE_SWITCHES = {
    "cfgpp_enabled": "cfgpp",
    "pag_enabled": "pag_scale",
    "seg_enabled": "seg_scale",
    "rescale_enabled": "rescale_phi",
    "nag_enabled": "nag_scale",
}
# Method group -> its enable control (None: "untitled" is a choice, not a switch).
METHOD_SWITCH = {
    "untitled": None,
    "cfgpp": "cfgpp_enabled",
    "pag": "pag_enabled",
    "seg": "seg_enabled",
    "freeu": "freeu_enabled",
    "rescale": "rescale_enabled",
    "dynthres": "dynthres_enabled",
    "apg": "apg_enabled",
    "cfgzero": "cfgzero_enabled",
    "tcfg": "tcfg_enabled",
    "mahiro": "mahiro_enabled",
    "skimmed": "skimmed_enabled",
    "fdg": "fdg_enabled",
    "nag": "nag_enabled",
    "cfg_interval": "cfg_interval",
}
# The combiner groups (at most one may be on: ``GuidanceSettings.conflict``).
COMBINER_METHODS = COMBINERS


@dataclass(frozen=True)
class Control:
    """One UI control / positional script arg."""

    name: str
    method: str
    kind: str  # checkbox | slider | number | dropdown | text
    label: str
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()
    info: str = ""


# A σ above every schedule's σ_max: what the UI shows for an open (infinite) high bound, since a
# number field cannot hold inf (gradio sends it as null).
OPEN_SIGMA = 1e4

_WINDOW_INFO = "step index or fraction 0–1; inclusive"
_HIRES = "also in the hires pass"
_ONE_COMBINER = "replaces CFG's combine; only one of " + ", ".join(COMBINER_LABELS.values()) + " at a time"

CONTROLS: tuple[Control, ...] = (
    Control("untitled", "untitled", "dropdown", "Untitled (ignores prompt and negative)", "off", choices=UNTITLED_MODES,
            info="off | empty prompt | zero conditioning | gibberish from the seed"),
    Control("cfgpp_enabled", "cfgpp", "checkbox", "CFG++", False, info="needs a CFG++ sampler"),
    Control("cfgpp", "cfgpp", "slider", "CFG++ λ", 0.6, 0.0, 1.0, 0.01, info="replaces the CFG scale; 0–1 as in the paper"),
    Control("cfgpp_hires", "cfgpp", "checkbox", _HIRES, True),
    Control("pag_enabled", "pag", "checkbox", "PAG (perturbed-attention guidance)", False),
    Control("pag_scale", "pag", "slider", "PAG scale", 3.0, 0.0, 20.0, 0.1),
    Control("pag_sanf", "pag", "checkbox", "SANF (saliency-adaptive fusion with CFG)", False),
    Control("pag_start", "pag", "number", "PAG start", 0.0, info=_WINDOW_INFO),
    Control("pag_end", "pag", "number", "PAG end", TO_THE_END, info=_WINDOW_INFO),
    Control("pag_layers", "pag", "text", "PAG layers", "M00", info="M00, INnn, OUTnn, ranges OUT00-OUT02, or all"),
    Control("pag_hires", "pag", "checkbox", _HIRES, True),
    Control("seg_enabled", "seg", "checkbox", "SEG (smoothed energy guidance)", False),
    Control("seg_scale", "seg", "slider", "SEG scale", 3.0, 0.0, 20.0, 0.1),
    Control("seg_sigma_inf", "seg", "checkbox", "σ = ∞ (every query = spatial mean)", True),
    Control("seg_sigma", "seg", "slider", "SEG blur σ (feature pixels)", 4.0, 0.1, 64.0, 0.1),
    Control("seg_start", "seg", "number", "SEG start", 0.0, info=_WINDOW_INFO),
    Control("seg_end", "seg", "number", "SEG end", TO_THE_END, info=_WINDOW_INFO),
    Control("seg_layers", "seg", "text", "SEG layers", "M00", info="M00, INnn, OUTnn, ranges, or all"),
    Control("seg_hires", "seg", "checkbox", _HIRES, True),
    Control("freeu_enabled", "freeu", "checkbox", "FreeU", False),
    Control("freeu_version", "freeu", "dropdown", "FreeU version", "2", choices=("1", "2")),
    Control("freeu_b1", "freeu", "slider", "b1 (backbone, 4×mc channels)", 1.3, 0.0, 3.0, 0.01),
    Control("freeu_b2", "freeu", "slider", "b2 (backbone, 2×mc channels)", 1.4, 0.0, 3.0, 0.01),
    Control("freeu_s1", "freeu", "slider", "s1 (skip low-pass)", 0.9, 0.0, 3.0, 0.01),
    Control("freeu_s2", "freeu", "slider", "s2 (skip low-pass)", 0.2, 0.0, 3.0, 0.01),
    Control("freeu_start", "freeu", "number", "FreeU start", 0.0, info=_WINDOW_INFO),
    Control("freeu_end", "freeu", "number", "FreeU end", 1.0, info=_WINDOW_INFO),
    Control("freeu_hires", "freeu", "checkbox", _HIRES, True),
    Control("rescale_enabled", "rescale", "checkbox", "CFG rescale", False),
    Control("rescale_phi", "rescale", "slider", "Rescale φ", 0.7, 0.0, 1.0, 0.01, info="std matching in v space"),
    Control("rescale_hires", "rescale", "checkbox", _HIRES, True),
    Control("dynthres_enabled", "dynthres", "checkbox", "Dynamic thresholding", False),
    Control("dynthres_mimic_scale", "dynthres", "slider", "Mimic CFG scale", 7.0, 1.0, 30.0, 0.5),
    Control("dynthres_threshold_percentile", "dynthres", "slider", "Threshold percentile", 100.0, 90.0, 100.0, 0.05),
    Control("dynthres_mimic_mode", "dynthres", "dropdown", "Mimic scale scheduler", "Constant", choices=DYNTHRES_SCHEDULES),
    Control("dynthres_mimic_scale_min", "dynthres", "slider", "Mimic scale minimum", 0.0, 0.0, 30.0, 0.5),
    Control("dynthres_cfg_mode", "dynthres", "dropdown", "CFG scale scheduler", "Constant", choices=DYNTHRES_SCHEDULES),
    Control("dynthres_cfg_scale_min", "dynthres", "slider", "CFG scale minimum", 0.0, 0.0, 30.0, 0.5),
    Control("dynthres_sched_val", "dynthres", "slider", "Scheduler value", 4.0, 0.0, 40.0, 0.01),
    Control("dynthres_separate_feature_channels", "dynthres", "checkbox", "Separate feature channels", True,
            info="off: one statistic over the whole batch, so images of a batch affect each other"),
    Control("dynthres_scaling_startpoint", "dynthres", "dropdown", "Scaling startpoint", "MEAN", choices=DYNTHRES_STARTPOINTS),
    Control("dynthres_variability_measure", "dynthres", "dropdown", "Variability measure", "AD", choices=DYNTHRES_MEASURES),
    Control("dynthres_interpolate_phi", "dynthres", "slider", "Interpolate φ", 1.0, 0.0, 1.0, 0.01),
    Control("dynthres_hires", "dynthres", "checkbox", _HIRES, True),
    # -- alternative combiners: one at a time -------------------------------------------------
    Control("apg_enabled", "apg", "checkbox", "APG (adaptive projected guidance)", False,
            info=_ONE_COMBINER + "; for high CFG (10–15) without oversaturation"),
    Control("apg_eta", "apg", "slider", "APG η (parallel part kept)", 0.0, -10.0, 10.0, 0.05,
            info="0 drops the part along D_c (paper); 1 = plain CFG direction"),
    Control("apg_norm_threshold", "apg", "slider", "APG norm threshold r", 5.0, 0.0, 50.0, 0.5,
            info="clips the guidance norm per image; 5 (ComfyUI) to 15 (reForge); 0 = no clip"),
    Control("apg_momentum", "apg", "slider", "APG momentum β", -0.5, -5.0, 1.0, 0.05,
            info="< 0: the paper's reverse momentum (−0.5 to −0.75); 0 = off"),
    Control("apg_form", "apg", "dropdown", "APG form", "paper", choices=APG_FORMS,
            info="paper: D_c + (w−1)·g' | comfyui: D_c + w·g' (ComfyUI's node)"),
    Control("apg_hires", "apg", "checkbox", _HIRES, True),
    Control("cfgzero_enabled", "cfgzero", "checkbox", "CFG-Zero*", False,
            info=_ONE_COMBINER + "; made for flow models, mild on SD1.5/SDXL"),
    Control("cfgzero_optimized_scale", "cfgzero", "checkbox", "optimized scale s*", True,
            info="scale the uncond by its least-squares match to the cond"),
    Control("cfgzero_zero_init_steps", "cfgzero", "number", "CFG-Zero* zero-init steps K", 0,
            info="the first K steps do not move; 0 = off (recommended on SD1.5/SDXL), 1 on flow models"),
    Control("cfgzero_form", "cfgzero", "dropdown", "CFG-Zero* form", "paper", choices=CFG_ZERO_FORMS,
            info="paper (noise space) | comfyui (s* on the denoised uncond)"),
    Control("cfgzero_hires", "cfgzero", "checkbox", _HIRES, True),
    Control("tcfg_enabled", "tcfg", "checkbox", "TCFG (tangential damping CFG)", False,
            info=_ONE_COMBINER + "; no parameters, usual CFG scales"),
    Control("tcfg_hires", "tcfg", "checkbox", _HIRES, True),
    Control("mahiro_enabled", "mahiro", "checkbox", "MaHiRo", False,
            info=_ONE_COMBINER + "; no parameters; images of a batch share one similarity"),
    Control("mahiro_hires", "mahiro", "checkbox", _HIRES, True),
    Control("skimmed_enabled", "skimmed", "checkbox", "Skimmed CFG", False,
            info=_ONE_COMBINER + "; anti-burn for very high CFG (15–30)"),
    Control("skimmed_scale", "skimmed", "slider", "Skimming CFG k", 7.0, 0.0, 10.0, 0.5,
            info="the scale used where guidance would burn; 7 (skim), 5 (linear)"),
    Control("skimmed_mode", "skimmed", "dropdown", "Skimmed mode", "skim", choices=SKIMMED_MODES,
            info="skim (main node) | linear (lin-interp node)"),
    Control("skimmed_full_negative", "skimmed", "checkbox", "full skim negative", False),
    Control("skimmed_flipping_filter", "skimmed", "checkbox", "flipping filter", True),
    Control("skimmed_hires", "skimmed", "checkbox", _HIRES, True),
    Control("fdg_enabled", "fdg", "checkbox", "FDG (frequency-decoupled guidance)", False,
            info=_ONE_COMBINER + "; CFG scale guides the low band: SDXL CFG 5, high 10–12"),
    Control("fdg_high_scale", "fdg", "slider", "FDG high-band scale", 12.0, 0.0, 100.0, 0.5,
            info="10 (diffusers) to 12 (pamparamm); equal to CFG = plain CFG"),
    Control("fdg_hires", "fdg", "checkbox", _HIRES, True),
    # -- stacked on any combiner --------------------------------------------------------------
    Control("nag_enabled", "nag", "checkbox", "NAG (normalized attention guidance)", False,
            info="negative prompt inside cross-attention; works at CFG 1 (untitled: 1 row per image)"),
    Control("nag_scale", "nag", "slider", "NAG scale φ", 3.0, 0.0, 50.0, 0.1,
            info="3 on SD1.5/SDXL (pamparamm s 2), 5 on distilled models; 1 = no change"),
    Control("nag_tau", "nag", "slider", "NAG τ", 2.5, 1.0, 10.0, 0.1, info="norm ratio cap; 2.5"),
    Control("nag_alpha", "nag", "slider", "NAG α", 0.25, 0.0, 1.0, 0.01, info="blend with the plain attention; 0.25–0.5"),
    Control("nag_layers", "nag", "text", "NAG layers", "all", info="all, M00, INnn, OUTnn, ranges"),
    Control("nag_start", "nag", "number", "NAG start", 0.0, info=_WINDOW_INFO),
    Control("nag_end", "nag", "number", "NAG end", TO_THE_END, info=_WINDOW_INFO),
    Control("nag_hires", "nag", "checkbox", _HIRES, True),
    Control("cfg_interval", "cfg_interval", "checkbox", "CFG interval (guidance only for σ in (low, high])", False,
            info="SDXL: CFG 15 with (0.28, 5.42]; outside it CFG 1 and no uncond row"),
    Control("cfg_interval_low", "cfg_interval", "number", "CFG interval σ low", 0.28, info="0 leaves the low side open"),
    Control("cfg_interval_high", "cfg_interval", "number", "CFG interval σ high", 5.42,
            info=f"{OPEN_SIGMA:g} or more leaves the high side open"),
    Control("cfg_interval_hires", "cfg_interval", "checkbox", _HIRES, True),
)

CONTROL_NAMES = tuple(c.name for c in CONTROLS)
CONTROL_BY_NAME = {c.name: c for c in CONTROLS}
CONTROL_DEFAULTS = {c.name: c.default for c in CONTROLS}
UI_ONLY = tuple(n for n in CONTROL_NAMES if n not in GuidanceSettings.field_names())
# Every settings field has exactly one control: the UI can express every record.
assert set(GuidanceSettings.field_names()) <= set(CONTROL_NAMES), "a GuidanceSettings field has no control"


def as_bool(name: str, value: Any) -> bool:
    return coerce(name, False, value)


def _control_value(name: str, value: Any) -> Any:
    """Coerce one control value to its control's type, naming the control on error."""
    control = CONTROL_BY_NAME[name]
    if control.kind == "checkbox":
        return as_bool(name, value)
    if control.kind in ("slider", "number"):
        return coerce(name, 0.0, value)
    return coerce(name, "", value)


def settings_from_controls(values: Mapping[str, Any]) -> GuidanceSettings:
    """The settings a set of control values means (missing controls take their defaults).

    A scale method is on when its switch is on and its scale is > 0; ``seg_sigma_inf`` (or an
    infinite ``seg_sigma``) gives σ = ∞, and a CFG interval high bound of ``OPEN_SIGMA`` or more
    an open one (∞). Bad values raise ``BadParameterError`` naming the control.
    """
    unknown = sorted(set(values) - set(CONTROL_NAMES))
    if unknown:
        raise BadParameterError(
            f"unknown Untitled Guidance parameter(s) {', '.join(unknown)}; valid names: {', '.join(CONTROL_NAMES)}"
        )
    v = {name: _control_value(name, value) for name, value in {**CONTROL_DEFAULTS, **values}.items()}
    fields: dict[str, Any] = {}
    for name in GuidanceSettings.field_names():
        fields[name] = v[name]
    for switch, scale in SCALE_SWITCHES.items():
        if not v[switch]:
            fields[scale] = 0.0
    if v["seg_sigma_inf"] or math.isinf(v["seg_sigma"]):
        fields["seg_sigma"] = math.inf
    if fields["cfg_interval_high"] >= OPEN_SIGMA:
        fields["cfg_interval_high"] = math.inf  # the same run either way; inf in the infotext says "open"
    return GuidanceSettings.from_mapping(fields)


def controls_from_settings(settings: GuidanceSettings) -> dict[str, Any]:
    """Control values that reproduce ``settings`` (an off method keeps its default slider values)."""
    out: dict[str, Any] = {}
    for control in CONTROLS:
        if control.name in GuidanceSettings.field_names():
            out[control.name] = getattr(settings, control.name)
    for switch, scale in SCALE_SWITCHES.items():
        on = getattr(settings, scale) > 0
        out[switch] = on
        if not on:
            out[scale] = CONTROL_BY_NAME[scale].default
    out["seg_sigma_inf"] = math.isinf(settings.seg_sigma)
    if out["seg_sigma_inf"]:
        out["seg_sigma"] = CONTROL_BY_NAME["seg_sigma"].default
    out["freeu_version"] = str(settings.freeu_version)
    if math.isinf(settings.cfg_interval_high):
        out["cfg_interval_high"] = OPEN_SIGMA
    return out
