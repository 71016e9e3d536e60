"""Paste: the control values a parsed infotext sets, method by method.

Per method our ``UG`` keys win, else the legacy keys of other extensions (``legacy``)
are mapped. The WebUI calls one ``infotext_fields`` function per control with the same params;
``PasteCache`` parses them once for all of them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from ...errors import BadParameterError
from .controls import CONTROL_DEFAULTS, METHOD_SWITCH, OPEN_SIGMA, SCALE_SWITCHES
from .infotext import DEFAULT_SETTINGS, INFOTEXT_KEYS, METHOD_FIELDS, Warn, parse_field
from .legacy import LEGACY_PARSERS, UNREADABLE
from .console import log


def _fallback(name: str) -> Any:
    """The value a missing or unreadable key of an *active* method falls back to: the UI's
    default for a method's scale (the settings default, 0, would switch the method off)."""
    if name in SCALE_SWITCHES.values():
        return CONTROL_DEFAULTS[name]
    return getattr(DEFAULT_SETTINGS, name)


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
            fields[name] = parse_field(name, params[key])
        except (ValueError, BadParameterError):
            warn(f"infotext {key}: {params[key]!r} is not a valid value; using {_fallback(name)!r}")
            fields[name] = _fallback(name)
    return fields


def _valid(fields: dict[str, Any], method: str, warn: Warn) -> bool:
    try:
        DEFAULT_SETTINGS.replace(**fields)
    except (BadParameterError, TypeError, ValueError) as err:
        warn(f"pasted {method} settings are invalid ({err}); {method} left as it is")
        return False
    return True


def parse_infotext_params(params: Mapping[str, str], *, warn: Warn = log) -> dict[str, Any]:
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
        if fields is None and method in LEGACY_PARSERS:
            fields = LEGACY_PARSERS[method](params, warn)
        if fields is UNREADABLE:
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
    if math.isinf(fields.get("cfg_interval_high", 0.0)):
        out["cfg_interval_high"] = OPEN_SIGMA
    return out


class PasteCache:
    """Paste calls one function per control with the same params; parse them once."""

    def __init__(self, warn: Warn = log):
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
