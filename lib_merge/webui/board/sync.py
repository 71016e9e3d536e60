"""Handlers that keep the board's controls consistent with each other and merge nothing: the
pickers after a refresh or a new model A, the controls a method shows, and the block sliders,
preset, α and weight string kept in step with one another and with the curve.

The weight string is the single source of truth for the blocks. Every way the blocks can change
(a slider released, α dragged or typed, a preset picked, the string typed or pasted, model A's
architecture, a recipe loaded) goes through ``block_state``: one function that turns a weight
string into the whole block area (sliders, string, curve, preset label, the field's message).
``javascript/merge_board.js`` only smooths drags and typing in the browser (the same values,
instantly); these handlers make the board correct without it.
"""
from __future__ import annotations

import re
from typing import Optional

from ...arch.spec import get_arch
from ...blocks import format_block_weights, parse_block_weights, preset_names, preset_values
from ...errors import MergeError
from ...methods import get_method
from .base import ALL_BLOCKS, LETTERS, NO_VAE, BoardBase, _match, _num
from .gradio_compat import _html_message, _update
from .plots import block_curve

CUSTOM = "custom"  # the preset label once the blocks match no preset
# One range for α, β and every block slider: extrapolation (below A, beyond B) is allowed on all
# of them alike; the weight string may still hold values beyond it (the slider then shows the end).
WEIGHT_MIN, WEIGHT_MAX = -1.0, 2.0
N_BLOCK_OUTPUTS = len(ALL_BLOCKS) + 4  # sliders, string, curve, preset, field message


class SyncHandlers(BoardBase):
    """Control-to-control handlers: each returns ``gr.update``s for the outputs ``build`` wires."""

    def on_refresh(self, a_title: Optional[str], *others: Optional[str]):
        self.checkpoints(refresh=True)
        return self._lists(a_title, others)

    def _lists(self, a_title: Optional[str], others) -> list:
        a_choices, b_choices = self.choices_for(a_title)
        updates = [_update(choices=a_choices, value=_match(a_title, a_choices))]
        for value in others:
            updates.append(_update(choices=b_choices, **_kept_value(value, b_choices)))
        updates.append(_update(choices=a_choices))  # recipe source picker
        updates.append(_update(choices=[NO_VAE] + [v.title for v in self.host.vaes()]))
        return updates

    def on_model_a(self, a_title: Optional[str], weights: str, alpha: float, *others: Optional[str]):
        """A changed: filter B… to A's architecture, switch the sliders between 26 and 20, re-read
        the weight string for the new architecture. A picker value is only cleared when it does
        not fit A: the values passed in may be older than what the user has picked since."""
        arch = self.arch_name(a_title)
        _, b_choices = self.choices_for(a_title)
        out = [_update(choices=b_choices, **_kept_value(v, b_choices)) for v in others]
        values, text, note = self._weights_for(arch, weights, _num(alpha, 0.5))
        out += self.block_state(arch, values, choices=True,
                                message=f"the weight string did not fit {get_arch(arch).label}: {note}" if note else "")
        out.append(self._arch_html(arch, a_title))
        return out

    def _weights_for(self, arch: str, text: str, alpha: float) -> tuple[dict[str, float], str, str]:
        try:
            values = parse_block_weights(text or None, arch, base=alpha)
            return values, format_block_weights(values, arch), ""
        except MergeError as exc:
            values = parse_block_weights(None, arch, base=alpha)
            return values, format_block_weights(values, arch), str(exc)

    # -- the one path for block weights ------------------------------------------------------------
    def block_state(self, arch: str, values: dict[str, float], *, message: str = "", choices: bool = False) -> list:
        """The block area for ``values``, in ``build``'s order: one update per slider (ALL_BLOCKS),
        the weight string, the curve, the preset label and the string's own message line."""
        blocks = get_arch(arch).blocks
        out = []
        for name in ALL_BLOCKS:
            if name in blocks:
                out.append(_update(visible=True, value=_clamp(values[name])))
            else:
                out.append(_update(visible=False))
        out.append(_update(value=format_block_weights(values, arch)))
        out.append(self.curve(arch, values))
        label = self.preset_label(arch, values)
        out.append(_update(choices=[CUSTOM] + preset_names(arch), value=label) if choices else _update(value=label))
        out.append(_field_message(message))
        return out

    @staticmethod
    def _unchanged_blocks(message: str = "") -> list:
        return [_update() for _ in range(N_BLOCK_OUTPUTS - 1)] + [_field_message(message, "error")]

    @staticmethod
    def preset_label(arch: str, values: dict[str, float]) -> str:
        """The preset whose weights the blocks hold, else "custom"."""
        blocks = get_arch(arch).blocks
        current = [values[b] for b in blocks]
        for name in preset_names(arch):
            if all(abs(a - b) < 1e-9 for a, b in zip(current, preset_values(name, arch))):
                return name
        return CUSTOM

    def on_preset(self, name: Optional[str], a_title: Optional[str]):
        """A preset picked by the user ("custom" is only a label: picking it changes nothing)."""
        arch = self.arch_name(a_title)
        if not name or name == CUSTOM:
            return [_update() for _ in range(N_BLOCK_OUTPUTS)]
        return self.block_state(arch, dict(zip(get_arch(arch).blocks, preset_values(name, arch))))

    def on_slider(self, block: str, value: float, text: str, a_title: Optional[str], alpha: float):
        """One slider released or typed into: set that block in the weight string (other values, even
        ones outside the sliders' range, are kept)."""
        arch = self.arch_name(a_title)
        values, _, note = self._weights_for(arch, text, _num(alpha, 0.5))
        if note:  # the string is being edited into something invalid: do not overwrite it
            return self._unchanged_blocks(note)
        if value is None or block not in values:
            return [_update() for _ in range(N_BLOCK_OUTPUTS)]
        values[block] = float(value)
        return self.block_state(arch, values)

    def on_alpha(self, alpha: float, a_title: Optional[str]):
        """The global α (dragged, or typed and committed with Enter / leaving the box) sets every block."""
        if not _is_number(alpha):
            return [_update() for _ in range(N_BLOCK_OUTPUTS)]  # a half-typed number: nothing to apply yet
        arch = self.arch_name(a_title)
        return self.block_state(arch, parse_block_weights(float(alpha), arch))

    def on_weights_text(self, text: str, a_title: Optional[str], alpha: float):
        """The weight string was submitted: parse it (presets, vectors, NAME=value overrides) and
        move the sliders; a bad string leaves everything as it was and says why, at the field."""
        arch = self.arch_name(a_title)
        try:
            values = parse_block_weights(text or None, arch, base=_num(alpha, 0.5))
        except MergeError as exc:
            return self._unchanged_blocks(str(exc))
        return self.block_state(arch, values)

    # -- other controls ------------------------------------------------------------------------------
    def _arch_html(self, arch: str, a_title: Optional[str]):
        import html

        spec = get_arch(arch)
        # data-model lets the page (and the browser test) see which A the shown state belongs to
        return _update(value=f"<span data-arch='{spec.name}' data-model='{html.escape(a_title or '', quote=True)}'>"
                             f"{spec.label}: {len(spec.blocks)} blocks</span>")

    def on_method(self, method_name: str):
        """The user picked a method: show its model pickers and parameter controls (from the
        registry), each parameter at its default."""
        return self._method_controls(method_name, reset=True)

    def on_method_view(self, method_name: str):
        """The method changed by any means (a loaded recipe too): show its controls, keep their values."""
        return self._method_controls(method_name, reset=False)

    def _method_controls(self, method_name: str, *, reset: bool):
        method = get_method(method_name)
        shown = len(LETTERS) if method.variadic else method.min_models
        out = [_update(visible=i < max(shown, 2), label=self._picker_label(method, i)) for i in range(1, len(LETTERS))]
        names = {p.name for p in method.params}
        out.append(_update(visible="alpha" in names, label=self._alpha_label(method)))
        out.append(_update(visible="beta" in names))
        out.append(_update(visible="alpha" in method.block_params))  # the block-weight area
        for name in self.param_names:
            p = method.param(name) if name in names else None
            if p is None:
                out.append(_update(visible=False))
            else:
                value = {"value": p.default} if reset else {}
                out.append(_update(visible=True, label=p.name, info=f"{p.help} ({p.describe_range()})", **value))
        out.append(_update(value=self.method_help(method)))
        return out

    @staticmethod
    def method_help(method) -> str:
        """The method's whole help (its docstring lines joined), never a cut line."""
        return f"**{method.name}** — " + re.sub(r"\s+", " ", method.help).strip()

    @staticmethod
    def _picker_label(method, index: int) -> str:
        letter = LETTERS[index]
        if index < method.min_models:
            return f"Model {letter}"
        return f"Model {letter} (optional)" if method.variadic else f"Model {letter} (unused)"

    @staticmethod
    def _alpha_label(method) -> str:
        return "α (B's share; 0 = A)" if method.name in ("weighted_sum", "slerp") else "α"

    def preview_size(self, a_title: Optional[str], width, height) -> list:
        """Preview width/height for A's architecture, where they still hold the other one's default."""
        default = 1024 if self.arch_name(a_title) == "sdxl" else 512
        return [_update(value=default) if _num(v, 0) in (512, 1024) else _update() for v in (width, height)]

    def on_page_load(self, a_title: Optional[str], *others: Optional[str]):
        """A page (re)loads: the lists, model A and the live switch as the server has them now — the
        page's build-time values may be from another model or another session."""
        self.checkpoints(refresh=True)
        out = self._lists(self.default_a() or a_title, others)
        out.append(_update(value=self.session.enabled))
        out.append(_html_message(self.session.status_line()))
        return out

    def curve(self, arch: str, values: dict[str, float]):
        return block_curve(get_arch(arch).blocks, [values[b] for b in get_arch(arch).blocks])


def _kept_value(value: Optional[str], choices: list[str]) -> dict:
    """Picker update keyword: leave a fitting value alone (no ``value`` key), clear one that no
    longer fits."""
    matched = _match(value, choices)
    if value and matched is None:
        return {"value": None}
    return {"value": matched} if matched != value else {}


def _is_number(value) -> bool:
    import math

    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _field_message(text: str, kind: str = "error") -> str:
    return _html_message(text, kind) if text else ""


def _clamp(v: float) -> float:
    return min(WEIGHT_MAX, max(WEIGHT_MIN, float(v)))
