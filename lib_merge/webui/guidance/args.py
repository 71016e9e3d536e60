"""Control values from the script's ``alwayson_scripts`` args: one dict by name, or the
positional list in ``CONTROLS`` order (what the UI passes).

API callers name what they set and leave the rest out, so a dict fills in the UI's defaults and
the switches its scales imply; unknown names or bad values raise ``BadParameterError`` naming
them and the valid names.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ...errors import BadParameterError
from ...guidance.settings import GuidanceSettings, coerce
from .controls import CONTROL_DEFAULTS, CONTROL_NAMES, CONTROLS, SCALE_SWITCHES, settings_from_controls


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


def api_error(err: BadParameterError) -> BadParameterError:
    """``err`` as an exception the host API answers without a traceback.

    Both hosts' API middleware prints a traceback for any exception except fastapi's
    ``HTTPException`` (its "known" errors) and answers ``{"error": type name, "errors": str(e)}``
    with the exception's ``status_code``, so the copy is both, keeps the type name and status 500
    the API has always answered, and prints as the bare message.
    """
    try:
        from fastapi.exceptions import HTTPException
    except ImportError:  # outside a host: the plain error
        return err

    class _ApiBadParameter(BadParameterError, HTTPException):
        def __str__(self) -> str:
            return self.detail

    _ApiBadParameter.__name__ = _ApiBadParameter.__qualname__ = "BadParameterError"
    out = _ApiBadParameter(str(err))
    HTTPException.__init__(out, status_code=500, detail=str(err))
    return out


def fail_before_sampling(p, err: BadParameterError) -> None:
    """Make this generation stop with ``err`` right after the scripts' ``process`` hook.

    Both hosts' ScriptRunner catches every exception a script hook raises (it prints a traceback
    and the image is made anyway), so ``process`` cannot fail the request itself. ``p.init`` is
    the call process_images_inner makes right after ``process``, outside the runner, before the
    prompts are encoded (A1111 1.10 and Forge alike); an instance attribute replaces it for this
    ``p`` only (X/Y/Z runs ``process`` again on each cell's copy).
    """
    failure = api_error(err)

    def init(*_args, **_kwargs):
        raise failure

    p.init = init
