"""X/Y/Z plot axes that vary the Merge Board's recipe: ``Merge alpha``, ``Merge block weights``
(preset names or weight strings), ``Merge method``, ``Merge model B`` and ``Merge block <NAME>``.

An axis only records its value on the cell's processing object (``p.mergeboard_xyz``); the
generation hook (``LiveSession.before_generation``) turns the board's recipe plus these overrides
into one live patch of the changed blocks — never a checkpoint reload — and writes the value into
the cell's infotext. After the last cell the model goes back to the board's state (A, or the
live-preview merge). Registration goes through the generic ``lib_merge.webui.hosts.xyz`` helper.

Weight strings contain commas, which separate X/Y/Z values: quote them (``"0,1,0.5,…"``) or
write them with ``;`` (``0;1;0.5;…`` / ``GRAD_V;M00=0``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from ...arch.spec import SD1
from ...blocks import format_block_weights, parse_block_weights, preset_names
from ...errors import MergeError
from ...methods import all_methods, get_method
from ...recipe import Recipe
from ..hosts.xyz import AxisDef

OVERRIDE_ATTR = "mergeboard_xyz"
LABELS = {
    "alpha": "Merge alpha",
    "weights": "Merge block weights",
    "method": "Merge method",
    "model_b": "Merge model B",
}
BLOCK_LABEL = "Merge block {}"


def _record(p: Any, key: str, value: Any) -> None:
    # a fresh dict per cell: X/Y/Z cells are shallow copies of one processing object
    current = dict(getattr(p, OVERRIDE_ATTR, None) or {})
    current[key] = value
    setattr(p, OVERRIDE_ATTR, current)


def weights_text(value: str) -> str:
    return str(value).strip().replace(";", ",")


def _arch_of(recipe: Recipe) -> str:
    from .host import arch_cache

    return arch_cache().arch(Path(recipe.models[0])) or "sd1"


def _resolve_model(value: str, host) -> str:
    text = str(value).strip()
    for c in host.checkpoints():
        if c.title == text or Path(c.path).name == text or c.title.split(" [")[0] == text:
            return str(c.path)
    if Path(text).is_file():
        return text
    raise MergeError(f"Merge model B: {text!r} is not in the checkpoint list; refresh the list or check the name")


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any], host) -> Recipe:
    """The board's recipe with one X/Y/Z cell's values applied (order: method, model B, α,
    block weights, single blocks)."""
    r = recipe
    if "method" in overrides:
        method = get_method(str(overrides["method"]).strip())
        if method.min_models > len(r.models):
            raise MergeError(
                f"Merge method: {method.name} needs {method.min_models} models ({', '.join(method.inputs)}); "
                f"the board has {len(r.models)} — add them on the Merge Board first"
            )
        models = r.models if method.variadic else r.models[: method.min_models]
        params = {k: v for k, v in r.params.items() if k in {p.name for p in method.params}}
        keep = {p.name for p in method.params}
        r = r.replace(method=method.name, models=tuple(models), params=params,
                      alpha=r.alpha if "alpha" in keep else None, beta=r.beta if "beta" in keep else None,
                      weights=r.weights if "alpha" in method.block_params else None)
    if "model_b" in overrides:
        if len(r.models) < 2:
            raise MergeError("Merge model B: the board's recipe has no model B")
        models = list(r.models)
        models[1] = _resolve_model(overrides["model_b"], host)
        r = r.replace(models=tuple(models))
    if "alpha" in overrides:
        r = r.replace(alpha=float(overrides["alpha"]), weights=None)
    arch = _arch_of(r)
    if "weights" in overrides:
        text = weights_text(overrides["weights"])
        parse_block_weights(text, arch, base=r.alpha if r.alpha is not None else 0.5)  # fail before patching
        r = r.replace(weights=text)
    blocks = {k[len("block:"):]: v for k, v in overrides.items() if k.startswith("block:")}
    if blocks:
        base = r.alpha if r.alpha is not None else 0.5
        values = parse_block_weights(r.weights, arch, base=base)
        for name, value in blocks.items():
            if name not in values:
                raise MergeError(f"Merge block {name}: this model has no block {name} (its blocks: {', '.join(values)})")
            values[name] = float(value)
        r = r.replace(weights=format_block_weights(values, arch))
    return r


def infotext_items(overrides: Mapping[str, Any]) -> dict[str, str]:
    """The cell's values under the axis labels, for its infotext."""
    items = {}
    for key, value in overrides.items():
        if key.startswith("block:"):
            items[BLOCK_LABEL.format(key[len("block:"):])] = f"{float(value):g}"
        elif key in LABELS:
            items[LABELS[key]] = weights_text(value) if key == "weights" else (f"{float(value):g}" if key == "alpha" else str(value))
    return items


def axes(session) -> list[AxisDef]:
    """Axis definitions bound to a live session (its host lists the models)."""
    host = session.host

    def board_arch() -> str:
        recipe = session.board_recipe
        return _arch_of(recipe) if recipe is not None else "sd1"

    def model_choices() -> list[str]:
        from .host import filter_by_arch

        arch = board_arch() if session.board_recipe is not None else None
        return [c.title for c in filter_by_arch(host.checkpoints(), arch)]

    def confirm_weights(values: list) -> None:
        arch = board_arch()
        for v in values:
            parse_block_weights(weights_text(v), arch, base=0.5)

    def confirm_methods(values: list) -> None:
        for v in values:
            get_method(str(v).strip())

    def confirm_models(values: list) -> None:
        for v in values:
            _resolve_model(v, host)

    def confirm_board(_values: list) -> None:
        if session.board_recipe is None:
            raise MergeError("Merge axes vary the Merge Board's recipe: open the Merge Board tab and pick models A and B first")

    def both(first, second):
        def run(values):
            first(values)
            second(values)
        return run

    defs = [
        AxisDef(LABELS["alpha"], float, lambda p, x: _record(p, "alpha", x), confirm=confirm_board),
        AxisDef(LABELS["weights"], str, lambda p, x: _record(p, "weights", x),
                choices=lambda: preset_names(board_arch()), confirm=both(confirm_board, confirm_weights)),
        AxisDef(LABELS["method"], str, lambda p, x: _record(p, "method", x),
                choices=lambda: [m.name for m in all_methods()], confirm=both(confirm_board, confirm_methods)),
        AxisDef(LABELS["model_b"], str, lambda p, x: _record(p, "model_b", x),
                choices=model_choices, confirm=both(confirm_board, confirm_models)),
    ]
    for name in SD1.blocks:
        defs.append(AxisDef(BLOCK_LABEL.format(name), float, _block_apply(name), confirm=confirm_board))
    return defs


def _block_apply(name: str):
    def apply(p, x):
        _record(p, f"block:{name}", x)

    return apply


def overrides_of(p: Any) -> Optional[dict]:
    value = getattr(p, OVERRIDE_ATTR, None)
    return dict(value) if value else None
