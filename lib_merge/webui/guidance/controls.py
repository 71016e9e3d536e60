"""The Untitled Guidance script's controls, and the mapping between control values and settings.

``CONTROLS`` is the one table the other guidance modules read: the gradio layout
(``ui``), API args (``args``), paste (``paste``) and the X/Y/Z axes
(``xyz``). Pure data and pure functions: no gradio or WebUI import, so it runs in tests
and on both hosts.

Names. A *control* is one value the UI passes to the script, in ``CONTROLS`` order (that order is
also the positional ``alwayson_scripts`` args list). Control names are ``GuidanceSettings`` field
names, plus five UI switches: ``cfgpp_enabled``, ``pag_enabled``, ``seg_enabled``,
``rescale_enabled`` (those methods are on when their scale is > 0; the switch keeps the slider's
value while the method is off) and ``seg_sigma_inf`` (σ = ∞ cannot live on a slider).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ...errors import BadParameterError
from ...guidance.settings import (
    DYNTHRES_MEASURES,
    DYNTHRES_SCHEDULES,
    DYNTHRES_STARTPOINTS,
    TO_THE_END,
    UNTITLED_MODES,
    GuidanceSettings,
    coerce,
)


# (switch control, scale field) of the methods switched on by a scale > 0.
SCALE_SWITCHES = {
    "cfgpp_enabled": "cfgpp",
    "pag_enabled": "pag_scale",
    "seg_enabled": "seg_scale",
    "rescale_enabled": "rescale_phi",
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
}


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


_WINDOW_INFO = "step index or fraction 0–1; inclusive"
_HIRES = "also in the hires pass"

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
    infinite ``seg_sigma``) gives σ = ∞. Bad values raise ``BadParameterError`` naming the control.
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
    return out
