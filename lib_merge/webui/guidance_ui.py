"""The Untitled Guidance script's controls, infotext keys, paste parsing, API args and X/Y/Z axes.

Everything here is pure data and pure functions: no gradio or WebUI import at module level, so
it runs in tests and on both hosts. ``build_ui`` takes the ``gradio`` module as an argument.

Names. A *control* is one value the UI passes to the script, in ``CONTROLS`` order (that order is
also the positional ``alwayson_scripts`` args list). Control names are ``GuidanceSettings`` field
names, plus five UI switches: ``cfgpp_enabled``, ``pag_enabled``, ``seg_enabled``,
``rescale_enabled`` (those methods are on when their scale is > 0; the switch keeps the slider's
value while the method is off) and ``seg_sigma_inf`` (σ = ∞ cannot live on a slider).

Infotext. We write only our own ``UG …`` keys (never the legacy ones: incantations, sd-webui-freeu
or sd-dynamic-thresholding, when installed, would enable themselves on paste and double-apply,
and their meanings differ from ours). Paste reads ours and the legacy keys, by value.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence

from ..errors import BadParameterError
from .xyz import AxisDef
from ..guidance.settings import (
    DYNTHRES_MEASURES,
    DYNTHRES_SCHEDULES,
    DYNTHRES_STARTPOINTS,
    TO_THE_END,
    UNTITLED_MODES,
    GuidanceSettings,
    coerce,
)

TITLE = "Untitled Guidance"
# The prefix of the X/Y/Z attributes set on ``p`` (``p.untitled_guidance_pag_scale``).
P_ATTR_PREFIX = "untitled_guidance_"
AXIS_PREFIX = "[Untitled Guidance] "

HINT = (
    "**Untitled** samples with no prompt at all (the prompt and negative are ignored) to show what the "
    "model has learned. With *empty* (SD1.x) or *zero*, prompt and negative are the same conditioning, "
    "so CFG alone does nothing: use **CFG scale 1 with PAG (3–5) or SEG (3, σ = ∞)**, 2 model rows per "
    "image and step. CFG++ needs one of the *CFG++* samplers and replaces the CFG scale by λ. Windows: a "
    "step index (0-based) or a fraction 0–1 of the run; both ends inclusive; 2048 means to the end."
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

# Our infotext keys, one per settings field (plus the rescale space, which is not a setting).
# Only word characters, spaces, '-' and '/': A1111's ``re_param_code`` accepts nothing else.
INFOTEXT_KEYS: dict[str, str] = {
    "untitled": "UG untitled",
    "cfgpp": "UG CFGpp lambda",
    "cfgpp_hires": "UG CFGpp hires",
    "pag_scale": "UG PAG scale",
    "pag_sanf": "UG PAG SANF",
    "pag_start": "UG PAG start",
    "pag_end": "UG PAG end",
    "pag_layers": "UG PAG layers",
    "pag_hires": "UG PAG hires",
    "seg_scale": "UG SEG scale",
    "seg_sigma": "UG SEG sigma",
    "seg_start": "UG SEG start",
    "seg_end": "UG SEG end",
    "seg_layers": "UG SEG layers",
    "seg_hires": "UG SEG hires",
    "freeu_enabled": "UG FreeU",
    "freeu_version": "UG FreeU version",
    "freeu_b1": "UG FreeU b1",
    "freeu_b2": "UG FreeU b2",
    "freeu_s1": "UG FreeU s1",
    "freeu_s2": "UG FreeU s2",
    "freeu_start": "UG FreeU start",
    "freeu_end": "UG FreeU end",
    "freeu_hires": "UG FreeU hires",
    "rescale_phi": "UG rescale phi",
    "rescale_hires": "UG rescale hires",
    "dynthres_enabled": "UG DynThres",
    "dynthres_mimic_scale": "UG DynThres mimic scale",
    "dynthres_threshold_percentile": "UG DynThres percentile",
    "dynthres_mimic_mode": "UG DynThres mimic mode",
    "dynthres_mimic_scale_min": "UG DynThres mimic min",
    "dynthres_cfg_mode": "UG DynThres CFG mode",
    "dynthres_cfg_scale_min": "UG DynThres CFG min",
    "dynthres_sched_val": "UG DynThres scheduler value",
    "dynthres_separate_feature_channels": "UG DynThres separate channels",
    "dynthres_scaling_startpoint": "UG DynThres startpoint",
    "dynthres_variability_measure": "UG DynThres measure",
    "dynthres_interpolate_phi": "UG DynThres phi",
    "dynthres_hires": "UG DynThres hires",
}
RESCALE_SPACE_KEY = "UG rescale space"
assert set(INFOTEXT_KEYS) == set(GuidanceSettings.field_names()), "every settings field needs an infotext key"
ALL_OUR_KEYS = frozenset(INFOTEXT_KEYS.values()) | {RESCALE_SPACE_KEY}

# Which settings fields belong to which method (the first one is what turns it on).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "untitled": ("untitled",),
    "cfgpp": ("cfgpp", "cfgpp_hires"),
    "pag": ("pag_scale", "pag_sanf", "pag_start", "pag_end", "pag_layers", "pag_hires"),
    "seg": ("seg_scale", "seg_sigma", "seg_start", "seg_end", "seg_layers", "seg_hires"),
    "freeu": ("freeu_enabled", "freeu_version", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2",
              "freeu_start", "freeu_end", "freeu_hires"),
    "rescale": ("rescale_phi", "rescale_hires"),
    "dynthres": tuple(f for f in GuidanceSettings.field_names() if f.startswith("dynthres_")),
}

_DEFAULT_SETTINGS = GuidanceSettings()


# ------------------------------------------------------------------------------ value coercion

def _as_bool(name: str, value: Any) -> bool:
    return coerce(name, False, value)


def _control_value(name: str, value: Any) -> Any:
    """Coerce one control value to its control's type, naming the control on error."""
    control = CONTROL_BY_NAME[name]
    if control.kind == "checkbox":
        return _as_bool(name, value)
    if control.kind in ("slider", "number"):
        return coerce(name, 0.0, value)
    return coerce(name, "", value)


def _method_on(settings: GuidanceSettings, method: str) -> bool:
    s = settings
    return {
        "untitled": s.untitled != "off",
        "cfgpp": s.cfgpp_on,
        "pag": s.pag_on,
        "seg": s.seg_on,
        "freeu": s.freeu_enabled,
        "rescale": s.rescale_on,
        "dynthres": s.dynthres_enabled,
    }[method]


# ------------------------------------------------------------------------- controls <-> settings

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


# ------------------------------------------------------------------------------------- API args

def controls_from_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """Control values from an API dict by name.

    Accepted names: every ``GuidanceSettings`` field and the UI switches. A scale given without
    its switch switches the method on when > 0 (``{"pag_scale": 3}`` is PAG at 3); a switch given
    without its scale uses the UI default scale; ``seg_sigma`` may be ``"inf"``.
    """
    unknown = sorted(set(values) - set(CONTROL_NAMES))
    if unknown:
        raise BadParameterError(
            f"unknown Untitled Guidance parameter(s) {', '.join(unknown)} in alwayson_scripts args; "
            f"valid names: {', '.join(CONTROL_NAMES)}"
        )
    out = dict(CONTROL_DEFAULTS)
    out.update(values)
    for switch, scale in SCALE_SWITCHES.items():
        if switch not in values and scale in values:
            out[switch] = coerce(scale, 0.0, values[scale]) > 0
    if "seg_sigma" in values and "seg_sigma_inf" not in values:
        out["seg_sigma_inf"] = math.isinf(coerce("seg_sigma", 0.0, values["seg_sigma"]))
    return out


def controls_from_args(args: Sequence[Any]) -> dict[str, Any]:
    """Control values from the script args: a single dict by name, or the positional list."""
    args = list(args)
    if args and isinstance(args[0], Mapping):
        extra = [a for a in args[1:len(CONTROLS)] if isinstance(a, Mapping)]
        if extra:
            raise BadParameterError("Untitled Guidance takes one dict of parameters, not several")
        return controls_from_mapping(args[0])
    if len(args) > len(CONTROLS):
        raise BadParameterError(
            f"Untitled Guidance got {len(args)} positional args; it takes at most {len(CONTROLS)} "
            f"({', '.join(CONTROL_NAMES)}) or one dict by name"
        )
    # A shorter list leaves the remaining controls at their defaults, as A1111's API does.
    values = dict(CONTROL_DEFAULTS)
    for control, value in zip(CONTROLS, args):
        if value is not None:
            values[control.name] = value
    return values


def settings_from_args(args: Sequence[Any]) -> GuidanceSettings:
    """``GuidanceSettings`` from script args (dict or positional); ``BadParameterError`` on bad input."""
    return settings_from_controls(controls_from_args(args))


# ----------------------------------------------------------------------------------- X/Y/Z and p

def p_attr(name: str) -> str:
    return P_ATTR_PREFIX + name


def apply_p_overrides(values: Mapping[str, Any], p: Any) -> dict[str, Any]:
    """Control values with X/Y/Z overrides (``p.untitled_guidance_<name>``) applied.

    An axis on a method's parameter switches that method on (as sd-dynamic-thresholding and
    incantations do), unless the same cell also sets the method's switch explicitly.
    """
    out = dict(values)
    switched: set[str] = set()
    for control in CONTROLS:
        attr = p_attr(control.name)
        if not hasattr(p, attr):
            continue
        out[control.name] = getattr(p, attr)
        switch = METHOD_SWITCH.get(control.method)
        if control.name == switch:
            switched.add(switch)
        elif switch is not None and switch not in switched and not hasattr(p, p_attr(switch)):
            if control.name in SCALE_SWITCHES.values():
                out[switch] = coerce(control.name, 0.0, out[control.name]) > 0
            else:
                out[switch] = True
        if control.name == "seg_sigma" and not hasattr(p, p_attr("seg_sigma_inf")):
            out["seg_sigma_inf"] = math.isinf(coerce("seg_sigma", 0.0, out["seg_sigma"]))
    return out


def _bool_axis_value(text: Any) -> bool:
    return _as_bool("axis value", text)


def _setter(name: str) -> Callable[[Any, Any], None]:
    def apply(p, value):
        setattr(p, p_attr(name), value)

    return apply


def _confirm(control: Control) -> Callable[[list], None]:
    """Refuse an axis value list up front if any value is not a valid setting for this control."""

    def confirm(values: list) -> None:
        switch = METHOD_SWITCH.get(control.method)
        for value in values:
            trial = {control.name: value}
            if switch is not None and switch != control.name:
                trial[switch] = True
            settings_from_controls(trial)

    return confirm


_SWITCH_AXIS_LABELS = {
    "cfgpp_enabled": "CFGpp on", "pag_enabled": "PAG on", "seg_enabled": "SEG on",
    "rescale_enabled": "rescale on", "freeu_enabled": "FreeU on", "dynthres_enabled": "DynThres on",
}


def axis_label(name: str) -> str:
    """"[Untitled Guidance] PAG scale": the infotext key's words, so a plot reads like the infotext."""
    words = _SWITCH_AXIS_LABELS.get(name) or INFOTEXT_KEYS[name][len("UG "):]
    return AXIS_PREFIX + words


def _axis_for(control: Control) -> AxisDef:
    label = axis_label(control.name)
    confirm = _confirm(control)
    if control.kind == "checkbox":
        def apply(p, value, _name=control.name):
            setattr(p, p_attr(_name), _bool_axis_value(value))

        return AxisDef(label, str, apply, choices=lambda: ["True", "False"], confirm=confirm)
    if control.kind == "dropdown":
        return AxisDef(label, str, _setter(control.name), choices=lambda c=control: list(c.choices), confirm=confirm)
    axis_type = float if control.kind in ("slider", "number") else str
    return AxisDef(label, axis_type, _setter(control.name), confirm=confirm)


# One axis per control except the σ = ∞ switch (an infinite σ is typed as "inf" on the σ axis).
AXES: tuple[AxisDef, ...] = tuple(_axis_for(c) for c in CONTROLS if c.name != "seg_sigma_inf")


# ------------------------------------------------------------------------------- infotext write

def _fmt(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        # Floats stay floats, unrounded: str() of a float round-trips exactly, and "1.0" (a
        # fraction of the run) must not turn into "1" on the way.
        return value
    return value


def infotext_items(settings: GuidanceSettings) -> dict[str, Any]:
    """Our infotext keys for the methods that are on; every parameter of an active method."""
    items: dict[str, Any] = {}
    for method, names in METHOD_FIELDS.items():
        if not _method_on(settings, method):
            continue
        for name in names:
            items[INFOTEXT_KEYS[name]] = _fmt(getattr(settings, name))
        if method == "rescale":
            from ..guidance.rescale import RESCALE_SPACE

            items[RESCALE_SPACE_KEY] = RESCALE_SPACE
    return items


def write_infotext(extra_generation_params: MutableMapping[str, Any], settings: GuidanceSettings) -> None:
    """Replace our keys in ``p.extra_generation_params`` (X/Y/Z cells share that dict)."""
    for key in ALL_OUR_KEYS:
        extra_generation_params.pop(key, None)
    extra_generation_params.update(infotext_items(settings))


# ------------------------------------------------------------------------------------- paste in

Warn = Callable[[str], None]


def _console(message: str) -> None:
    print(f"[{TITLE}] {message}")


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(text)


def _parse_float(text: str) -> float:
    return float(str(text).strip())


def _int_or_float(text: str):
    """sd-webui-freeu's own rule: an integer literal is a step, anything else a float."""
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_field(name: str, text: str) -> Any:
    default = getattr(_DEFAULT_SETTINGS, name)
    if isinstance(default, bool):
        return _parse_bool(text)
    if isinstance(default, float):
        return _parse_float(text)
    return coerce(name, default, str(text).strip())


def _fallback(name: str) -> Any:
    """The value a missing or unreadable key of an *active* method falls back to: the UI's
    default for a method's scale (the settings default, 0, would switch the method off)."""
    if name in SCALE_SWITCHES.values():
        return CONTROL_DEFAULTS[name]
    return getattr(_DEFAULT_SETTINGS, name)


def _ours(params: Mapping[str, str], method: str, warn: Warn) -> Optional[dict[str, Any]]:
    """Settings fields of ``method`` from our keys, or None if none of its keys is present."""
    names = METHOD_FIELDS[method]
    if not any(INFOTEXT_KEYS[n] in params for n in names):
        return None
    fields: dict[str, Any] = {}
    for name in names:
        key = INFOTEXT_KEYS[name]
        if key not in params:
            # We write every parameter of an active method; a missing one comes from an edited text.
            fields[name] = _fallback(name)
            continue
        try:
            fields[name] = _parse_field(name, params[key])
        except (ValueError, BadParameterError):
            warn(f"infotext {key}: {params[key]!r} is not a valid value; using {_fallback(name)!r}")
            fields[name] = _fallback(name)
    return fields


# A legacy parser's answer for keys that are present but cannot be read: leave the method alone.
_UNREADABLE: Any = object()


def _legacy_pag(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """incantations' PAG keys (written only while PAG is active)."""
    keys = ("PAG Active", "PAG Scale", "PAG Start Step", "PAG End Step", "PAG SANF")
    if not any(k in params for k in keys):
        return None
    try:
        active = _parse_bool(params["PAG Active"]) if "PAG Active" in params else True
        scale = _parse_float(params["PAG Scale"]) if "PAG Scale" in params else CONTROL_BY_NAME["pag_scale"].default
        fields = {
            "pag_scale": scale if active else 0.0,
            "pag_sanf": _parse_bool(params.get("PAG SANF", "False")),
            "pag_start": _parse_float(params.get("PAG Start Step", "0")),
            "pag_end": _parse_float(params.get("PAG End Step", str(TO_THE_END))),
        }
    except ValueError:
        warn("incantations PAG keys have an unreadable value; PAG left as it is")
        return _UNREADABLE
    return fields


def _legacy_seg(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """incantations' SEG keys: ``SEG Blur Sigma`` is the exponent n of σ = 2ⁿ, n > 10.5 ⇒ ∞, n = 0 off.

    incantations' SEG has no scale: it blurs the queries of the *uncond* rows and runs plain CFG,
    D = D_ũ + w(D_c − D_ũ) = D_c + (w − 1)(D_c − D_ũ). With prompt ≡ negative (empty prompts on
    SD1.x, the untitled case) ũ is the blurred cond pass, so this is paper SEG with s = w − 1; we
    map it that way (exact there, an approximation with a real prompt). Without a ``CFG scale`` in
    the infotext the paper's default s = 3 is used.
    """
    keys = ("SEG Active", "SEG Blur Sigma", "SEG Start Step", "SEG End Step", "SEG Scale")
    if not any(k in params for k in keys):
        return None
    try:
        # incantations writes its SEG keys only while SEG is active (an infotext without
        # "SEG Active" but with the others comes from such a run), so their presence means on.
        active = _parse_bool(params["SEG Active"]) if "SEG Active" in params else True
        threshold = _parse_float(params.get("SEG Blur Threshold", "10.5"))
        n = _parse_float(params.get("SEG Blur Sigma", "11"))
        if "SEG Scale" in params:  # an early incantations version had a real SEG scale
            scale = _parse_float(params["SEG Scale"])
        elif "CFG scale" in params:
            scale = max(_parse_float(params["CFG scale"]) - 1.0, 0.0)
            if scale == 0:
                warn("incantations SEG at CFG scale ≤ 1 had no effect (it acts through CFG); SEG left off")
        else:
            scale = 3.0
        fields = {
            "seg_scale": scale if (active and n > 0) else 0.0,
            "seg_sigma": math.inf if n > threshold else 2.0 ** n,
            "seg_start": _parse_float(params.get("SEG Start Step", "0")),
            "seg_end": _parse_float(params.get("SEG End Step", str(TO_THE_END))),
        }
    except ValueError:
        warn("incantations SEG keys have an unreadable value; SEG left as it is")
        return _UNREADABLE
    return fields


_FREEU_STAGE_DEFAULTS = {
    "backbone_factor": 1.0, "skip_factor": 1.0, "backbone_offset": 0.0, "backbone_width": 0.5,
    "skip_cutoff": 0.0, "skip_high_end_factor": 1.0,
}


def _legacy_freeu(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """sd-webui-freeu's keys. It has no enable key: it writes them only while enabled and its own
    paste re-enables (``freeu_png_info_auto_enable``), so their presence means on."""
    keys = ("FreeU Stages", "FreeU Schedule", "FreeU Version")
    if not any(k in params for k in keys):
        return None
    fields: dict[str, Any] = {"freeu_enabled": True}
    try:
        stages = json.loads(params["FreeU Stages"]) if "FreeU Stages" in params else []
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise ValueError("FreeU Stages")
        full = [{**_FREEU_STAGE_DEFAULTS, **s} for s in stages] + [dict(_FREEU_STAGE_DEFAULTS)] * 2
        fields["freeu_b1"], fields["freeu_s1"] = float(full[0]["backbone_factor"]), float(full[0]["skip_factor"])
        fields["freeu_b2"], fields["freeu_s2"] = float(full[1]["backbone_factor"]), float(full[1]["skip_factor"])
        lost = [f"stage {i + 1} {k}" for i, s in enumerate(full[:2]) for k in
                ("backbone_offset", "backbone_width", "skip_cutoff", "skip_high_end_factor")
                if float(s[k]) != _FREEU_STAGE_DEFAULTS[k]]
        if len(stages) > 2 and any(float(stages[2].get(k, d)) != d for k, d in _FREEU_STAGE_DEFAULTS.items()):
            lost.append("stage 3 (320 channels)")
        if lost:
            warn(f"sd-webui-freeu options we do not have were ignored: {', '.join(lost)}")
        if "FreeU Version" in params:
            version = str(params["FreeU Version"]).strip().replace("Version ", "")
            fields["freeu_version"] = int(version)
        else:
            fields["freeu_version"] = 1  # sd-webui-freeu's State default
        if "FreeU Schedule" in params:
            start, stop, smooth, *_ = [s.strip() for s in str(params["FreeU Schedule"]).split(",")] + ["0", "1.0", "0"]
            start_v, stop_v = _int_or_float(start), _int_or_float(stop)
            fields["freeu_start"] = float(start_v)
            # sd-webui-freeu's window is start <= step < stop; ours is inclusive at both ends.
            fields["freeu_end"] = float(stop_v - 1) if isinstance(stop_v, int) else float(stop_v)
            if float(smooth) != 0:
                warn(f"sd-webui-freeu transition smoothness {smooth} is not supported; FreeU uses hard window edges")
    except (ValueError, TypeError, KeyError):
        warn("sd-webui-freeu keys have an unreadable value; FreeU left as it is")
        return _UNREADABLE
    return fields


_DYNTHRES_LEGACY = {
    "Mimic scale": "dynthres_mimic_scale",
    "Threshold percentile": "dynthres_threshold_percentile",
    "Mimic mode": "dynthres_mimic_mode",
    "Mimic scale minimum": "dynthres_mimic_scale_min",
    "CFG mode": "dynthres_cfg_mode",
    "CFG scale minimum": "dynthres_cfg_scale_min",
    "Scheduler value": "dynthres_sched_val",
    "Separate Feature Channels": "dynthres_separate_feature_channels",
    "Scaling Startpoint": "dynthres_scaling_startpoint",
    "Variability Measure": "dynthres_variability_measure",
    "Interpolate Phi": "dynthres_interpolate_phi",
}


def _legacy_dynthres(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """sd-dynamic-thresholding's keys; "Dynamic thresholding enabled" is always written with them."""
    if "Dynamic thresholding enabled" not in params:
        return None
    try:
        fields: dict[str, Any] = {"dynthres_enabled": _parse_bool(params["Dynamic thresholding enabled"])}
        for key, name in _DYNTHRES_LEGACY.items():
            fields[name] = _parse_field(name, params[key]) if key in params else getattr(_DEFAULT_SETTINGS, name)
    except (ValueError, BadParameterError):
        warn("sd-dynamic-thresholding keys have an unreadable value; dynamic thresholding left as it is")
        return _UNREADABLE
    return fields


_LEGACY = {"pag": _legacy_pag, "seg": _legacy_seg, "freeu": _legacy_freeu, "dynthres": _legacy_dynthres}


def _valid(fields: dict[str, Any], method: str, warn: Warn) -> bool:
    try:
        _DEFAULT_SETTINGS.replace(**fields)
    except (BadParameterError, TypeError, ValueError) as err:
        warn(f"pasted {method} settings are invalid ({err}); {method} left as it is")
        return False
    return True


def parse_infotext_params(params: Mapping[str, str], *, warn: Warn = _console) -> dict[str, Any]:
    """Control values to set from a parsed infotext (``parse_generation_parameters`` output).

    Per method: our ``UG`` keys win; else the legacy keys of incantations (PAG, SEG),
    sd-webui-freeu and sd-dynamic-thresholding are mapped; values are always parsed, never
    "key present ⇒ on". A method with no key at all is switched **off** (we write every active
    method, so the image was made without it) while its sliders keep their values. Bad values
    give one console line and leave that method's controls unchanged.
    """
    out: dict[str, Any] = {}
    for method in METHOD_FIELDS:
        fields = _ours(params, method, warn)
        if fields is None and method in _LEGACY:
            fields = _LEGACY[method](params, warn)
        if fields is _UNREADABLE:
            continue
        if fields is None:
            switch = METHOD_SWITCH[method]
            if switch is None:
                out["untitled"] = "off"
            else:
                out[switch] = False
            continue
        if not _valid(fields, method, warn):
            continue
        out.update(_fields_to_controls(method, fields))
    return out


def _fields_to_controls(method: str, fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for switch, scale in SCALE_SWITCHES.items():
        if scale in fields:
            on = fields[scale] > 0
            out[switch] = on
            if not on:
                del out[scale]  # keep the user's slider value for a method that stays off
    if "seg_sigma" in fields:
        out["seg_sigma_inf"] = math.isinf(fields["seg_sigma"])
        if out["seg_sigma_inf"]:
            del out["seg_sigma"]
    if "freeu_version" in fields:
        out["freeu_version"] = str(fields["freeu_version"])
    return out


class PasteCache:
    """Paste calls one function per control with the same params; parse them once."""

    def __init__(self, warn: Warn = _console):
        self.warn = warn
        self._key: Any = None
        self._value: dict[str, Any] = {}

    def values(self, params: Mapping[str, str]) -> dict[str, Any]:
        key = tuple(sorted((str(k), str(v)) for k, v in params.items()))
        if key != self._key:
            self._value = parse_infotext_params(params, warn=self.warn)
            self._key = key
        return self._value

    def getter(self, name: str) -> Callable[[Mapping[str, str]], Any]:
        """``infotext_fields`` callable for one control: its value, or None to leave it unchanged."""

        def get(params):
            return self.values(params).get(name)

        return get


# ------------------------------------------------------------------------------------ gradio UI

def build_ui(gr, elem_id: Callable[[str], str]) -> list:
    """Create the controls inside the caller's gradio Blocks context; returns them in ``CONTROLS`` order.

    Only the portable gradio subset (3.41 and 4.x): Accordion, Group, Row, Markdown, Checkbox,
    Slider, Number, Dropdown, Textbox; values, no ``.style()``.
    """
    made: dict[str, Any] = {}

    def make(name: str):
        c = CONTROL_BY_NAME[name]
        kwargs = dict(label=c.label, elem_id=elem_id(name))
        if c.kind == "checkbox":
            comp = gr.Checkbox(value=c.default, **kwargs)
        elif c.kind == "slider":
            comp = gr.Slider(minimum=c.minimum, maximum=c.maximum, step=c.step, value=c.default, **kwargs)
        elif c.kind == "number":
            comp = gr.Number(value=c.default, **kwargs)
        elif c.kind == "dropdown":
            comp = gr.Dropdown(choices=list(c.choices), value=c.default, **kwargs)
        else:
            comp = gr.Textbox(value=c.default, lines=1, **kwargs)
        made[name] = comp
        return comp

    groups = {}
    for c in CONTROLS:
        groups.setdefault(c.method, []).append(c.name)

    with gr.Accordion(TITLE, open=False, elem_id=elem_id("accordion")):
        gr.Markdown(HINT)
        with gr.Row():
            make("untitled")
        for method, names in groups.items():
            if method == "untitled":
                continue
            with gr.Group():
                switch = METHOD_SWITCH[method]
                hires = f"{method}_hires"
                with gr.Row():
                    make(switch)
                    make(hires)
                rest = [n for n in names if n not in (switch, hires)]
                for i in range(0, len(rest), 3):
                    with gr.Row():
                        for name in rest[i:i + 3]:
                            make(name)
    return [made[c.name] for c in CONTROLS]


class PasteKey(str):
    """An ``infotext_fields`` target that is both a callable and a name.

    Paste (``connect_paste``, the API's ``apply_infotext``) calls it with the parsed params, so
    every control is restored by value. The "Send to img2img" buttons instead copy the controls
    whose *name* is in ``Script.paste_field_names``; a plain callable has no name, so this str
    subclass carries one (``"Untitled Guidance <control>"``), never a key found in infotexts.
    """

    def __new__(cls, name: str, getter: Callable[[Mapping[str, str]], Any]):
        obj = super().__new__(cls, f"{TITLE} {name}")
        obj._getter = getter
        return obj

    def __call__(self, params: Mapping[str, str]) -> Any:
        return self._getter(params)


def infotext_fields(components: Sequence[Any], cache: PasteCache) -> list[tuple[Any, "PasteKey"]]:
    """(component, target) pairs for ``Script.infotext_fields``: every control restored by value."""
    return [(comp, PasteKey(c.name, cache.getter(c.name))) for comp, c in zip(components, CONTROLS)]


def send_to_names() -> list[str]:
    """``Script.paste_field_names``: our controls travel with the "Send to" buttons."""
    return [f"{TITLE} {c.name}" for c in CONTROLS]
