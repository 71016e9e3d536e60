"""X/Y/Z plot axes for the Untitled Guidance controls, and the overrides they leave on ``p``.

An axis only sets ``p.untitled_guidance_<control>`` on the cell's processing object;
``apply_p_overrides`` folds those attributes into the script's control values when the cell
runs. Both ends of that attribute protocol live here. Registration goes through the generic
``lib_merge.webui.hosts.xyz`` helper.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from ...errors import BadParameterError
from ...guidance.settings import COMBINER_LABELS, coerce
from .controls import CONTROLS, METHOD_SWITCH, SCALE_SWITCHES, Control, as_bool, settings_from_controls
from .infotext import INFOTEXT_KEYS
from ..hosts.xyz import AxisDef

# The prefix of the X/Y/Z attributes set on ``p`` (``p.untitled_guidance_pag_scale``).
P_ATTR_PREFIX = "untitled_guidance_"
AXIS_PREFIX = "[Untitled Guidance] "


def p_attr(name: str) -> str:
    return P_ATTR_PREFIX + name


def apply_p_overrides(values: Mapping[str, Any], p: Any) -> dict[str, Any]:
    """Control values with X/Y/Z overrides (``p.untitled_guidance_<name>``) applied.

    An axis on a method's parameter switches that method on (as sd-dynamic-thresholding and
    incantations do), unless the same cell also sets the method's switch explicitly or the
    combiner axis picks the combiner.
    """
    out = dict(values)
    switched: set[str] = set()
    if hasattr(p, p_attr(COMBINER_AXIS)):
        # The combiner axis sets every combiner switch; a combiner's parameter axis then does not.
        chosen = combiner_name(getattr(p, p_attr(COMBINER_AXIS)))
        for name in COMBINER_LABELS:
            out[f"{name}_enabled"] = name == chosen
            switched.add(f"{name}_enabled")
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
    return as_bool("axis value", text)


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
    "apg_enabled": "APG on", "cfgzero_enabled": "CFG-Zero on", "tcfg_enabled": "TCFG on",
    "mahiro_enabled": "MaHiRo on", "skimmed_enabled": "Skimmed CFG on", "fdg_enabled": "FDG on",
    "nag_enabled": "NAG on", "cfg_interval": "CFG interval on",
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


# The combiner axis: one cell per combiner (plain CFG included), switching the others off.
COMBINER_AXIS = "combiner"
COMBINER_CHOICES = ("CFG",) + tuple(COMBINER_LABELS.values())


def combiner_name(value: Any) -> str:
    """"cfg" or the combiner's field prefix, from its label or prefix (any case)."""
    text = str(value).strip().lower()
    names = {"cfg": "cfg", **{label.lower(): n for n, label in COMBINER_LABELS.items()},
             **{n: n for n in COMBINER_LABELS}}
    if text not in names:
        raise BadParameterError(f"combiner {value!r}: choose one of {', '.join(COMBINER_CHOICES)}")
    return names[text]


def _combiner_axis() -> AxisDef:
    def confirm(values: list) -> None:
        for value in values:
            name = combiner_name(value)
            if name != "cfg":
                settings_from_controls({f"{name}_enabled": True})

    return AxisDef(AXIS_PREFIX + "combiner", str, _setter(COMBINER_AXIS), choices=lambda: list(COMBINER_CHOICES),
                   confirm=confirm)


# One axis per control except the σ = ∞ switch (an infinite σ is typed as "inf" on the σ axis).
AXES: tuple[AxisDef, ...] = tuple(_axis_for(c) for c in CONTROLS if c.name != "seg_sigma_inf") + (_combiner_axis(),)
