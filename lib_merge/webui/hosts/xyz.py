"""X/Y/Z plot axes: host-free definitions, registered into the WebUI's live ``xyz_grid`` module.

Features describe their axes as ``AxisDef`` records (label, type, apply, format, choices,
confirm); ``register_axes`` turns them into the host's ``AxisOption`` objects. Both A1111 and
Forge keep the axes in the module global ``axis_options`` of ``scripts/xyz_grid.py``, loaded under
the module name ``"xyz_grid.py"``. Importing ``scripts.xyz_grid`` would create a second copy
whose list the UI never reads, so the live module is taken from ``modules.scripts.scripts_data``.
Register from ``on_before_ui``: after every script is loaded, before ``xyz_grid``'s ``ui()``
snapshots the list (``on_app_started`` is too late).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

XYZ_MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")


@dataclass(frozen=True)
class AxisDef:
    """One axis, independent of the host.

    ``type`` converts one cell's text (int, float, str or any converter, as the host's
    ``AxisOption``); ``apply(p, value)`` stores a cell's value on the processing object;
    ``choices`` (a callable returning strings) makes the host show a dropdown; ``format(p, opt,
    value)`` labels a cell (None: "label: value"); ``confirm(values)`` raises to refuse a value
    list before anything is generated; ``cost`` orders loops (1.0 = checkpoint switching).
    """

    label: str
    type: Callable[[str], Any]
    apply: Callable[[Any, Any], None]
    choices: Optional[Callable[[], list]] = None
    format: Optional[Callable[[Any, Any, Any], str]] = None
    confirm: Optional[Callable[[list], None]] = None
    cost: float = 0.0


def find_xyz_module(scripts_module) -> Any:
    """The live ``xyz_grid`` module among the loaded scripts, or None."""
    for data in getattr(scripts_module, "scripts_data", []):
        if getattr(data.script_class, "__module__", None) in XYZ_MODULE_NAMES:
            return data.module
    return None


def to_axis_option(xyz_module, axis: AxisDef):
    """The host ``AxisOption`` for ``axis`` (adapts the host's ``apply(p, x, xs)`` / ``confirm(p, xs)``)."""

    def apply(p, x, xs):
        axis.apply(p, x)

    def confirm(p, xs):
        axis.confirm(list(xs))

    return xyz_module.AxisOption(
        axis.label,
        axis.type,
        apply,
        format_value=axis.format or xyz_module.format_value_add_label,
        confirm=confirm if axis.confirm is not None else None,
        cost=axis.cost,
        choices=axis.choices,
    )


def register_axes(axes: Sequence[AxisDef], *, log: Callable[[str], None] = print) -> int:
    """Append ``axes`` to the live ``xyz_grid.axis_options``; labels already there are skipped
    (Reload UI re-runs this). Returns how many were added; never raises."""
    try:
        from modules import scripts
    except ImportError:
        return 0
    xyz_module = find_xyz_module(scripts)
    if xyz_module is None or not hasattr(xyz_module, "axis_options") or not hasattr(xyz_module, "AxisOption"):
        log("[X/Y/Z] the built-in X/Y/Z plot script is not loaded; no axes registered")
        return 0
    existing = {getattr(opt, "label", None) for opt in xyz_module.axis_options}
    added = 0
    for axis in axes:
        if axis.label in existing:
            continue
        try:
            xyz_module.axis_options.append(to_axis_option(xyz_module, axis))
        except Exception as err:  # one odd host class must not take the other axes down
            log(f"[X/Y/Z] could not register axis {axis.label!r}: {err}")
            continue
        existing.add(axis.label)
        added += 1
    return added
