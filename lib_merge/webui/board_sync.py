"""Handlers that keep the board's controls consistent with each other and merge nothing: the
pickers after a refresh or a new model A, the controls a method shows, and the block sliders,
preset, α and weight string kept in step with one another and with the curve.

``javascript/merge_board.js`` syncs sliders and weight string instantly in the browser; these run
on slider release and string submit so the board also works without the script.
"""
from __future__ import annotations

from typing import Optional

from ..arch.spec import get_arch
from ..blocks import format_block_weights, parse_block_weights, preset_names, preset_values
from ..errors import MergeError
from ..methods import get_method
from .board_base import ALL_BLOCKS, LETTERS, NO_VAE, BoardBase, _match, _num
from .board_gradio import _html_message, _update
from .board_plots import block_curve


class SyncHandlers(BoardBase):
    """Control-to-control handlers: each returns ``gr.update``s for the outputs ``build`` wires."""

    def on_refresh(self, a_title: Optional[str], *others: Optional[str]):
        self.checkpoints(refresh=True)
        a_choices, b_choices = self.choices_for(a_title)
        updates = [_update(choices=a_choices, value=_match(a_title, a_choices))]
        for value in others:
            updates.append(_update(choices=b_choices, value=_match(value, b_choices)))
        updates.append(_update(choices=a_choices))  # recipe source picker
        updates.append(_update(choices=[NO_VAE] + [v.title for v in self.host.vaes()]))
        return updates

    def on_model_a(self, a_title: Optional[str], weights: str, alpha: float, *others: Optional[str]):
        """A changed: filter B… to A's architecture, switch the sliders between 26 and 20, re-read
        the weight string for the new architecture."""
        arch = self.arch_name(a_title)
        _, b_choices = self.choices_for(a_title)
        out = [_update(choices=b_choices, value=_match(v, b_choices)) for v in others]
        values, text, note = self._weights_for(arch, weights, _num(alpha, 0.5))
        out += self._slider_updates(arch, values)
        out.append(_update(value=text))
        out.append(_update(choices=preset_names(arch), value=None))
        out.append(self._arch_html(arch, a_title))
        out.append(self.curve(arch, values))
        return out

    def _weights_for(self, arch: str, text: str, alpha: float) -> tuple[dict[str, float], str, str]:
        try:
            values = parse_block_weights(text or None, arch, base=alpha)
            return values, format_block_weights(values, arch), ""
        except MergeError as exc:
            values = parse_block_weights(None, arch, base=alpha)
            return values, format_block_weights(values, arch), str(exc)

    def _slider_updates(self, arch: str, values: dict[str, float]) -> list:
        blocks = get_arch(arch).blocks
        out = []
        for name in ALL_BLOCKS:
            if name in blocks:
                out.append(_update(visible=True, value=_clamp(values[name])))
            else:
                out.append(_update(visible=False))
        return out

    def _arch_html(self, arch: str, a_title: Optional[str]):
        spec = get_arch(arch)
        return _update(value=f"<span data-arch='{spec.name}'>{spec.label}: {len(spec.blocks)} blocks</span>")

    def on_method(self, method_name: str):
        """Method changed: show its model pickers and parameter controls (from the registry)."""
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
                out.append(_update(visible=True, value=p.default, label=p.name, info=f"{p.help} ({p.describe_range()})"))
        out.append(_update(value=f"**{method.name}** — {method.help.splitlines()[0]}"))
        return out

    @staticmethod
    def _picker_label(method, index: int) -> str:
        letter = LETTERS[index]
        if index < method.min_models:
            return f"Model {letter}"
        return f"Model {letter} (optional)" if method.variadic else f"Model {letter} (unused)"

    @staticmethod
    def _alpha_label(method) -> str:
        return "α (B's share; 0 = A)" if method.name in ("weighted_sum", "slerp") else "α"

    def on_preset(self, name: Optional[str], a_title: Optional[str]):
        arch = self.arch_name(a_title)
        if not name:
            return [_update() for _ in ALL_BLOCKS] + [_update(), _update()]
        values = dict(zip(get_arch(arch).blocks, preset_values(name, arch)))
        return self._slider_updates(arch, values) + [_update(value=format_block_weights(values, arch)), self.curve(arch, values)]

    def on_slider(self, block: str, value: float, text: str, a_title: Optional[str], alpha: float):
        """One slider released: set that block in the weight string (other values, even ones outside
        the sliders' 0–1 range, are kept)."""
        arch = self.arch_name(a_title)
        values, _, _ = self._weights_for(arch, text, _num(alpha, 0.5))
        if block in values:
            values[block] = float(value)
        return _update(value=format_block_weights(values, arch)), self.curve(arch, values)

    def on_alpha(self, alpha: float, a_title: Optional[str]):
        """The global α sets every block."""
        arch = self.arch_name(a_title)
        values = parse_block_weights(float(alpha), arch)
        return self._slider_updates(arch, values) + [_update(value=format_block_weights(values, arch)), self.curve(arch, values)]

    def on_weights_text(self, text: str, a_title: Optional[str], alpha: float):
        """The weight string was submitted: parse it (presets, vectors, NAME=value overrides) and
        move the sliders; a bad string leaves everything as it was and says why."""
        arch = self.arch_name(a_title)
        try:
            values = parse_block_weights(text or None, arch, base=_num(alpha, 0.5))
        except MergeError as exc:
            return [_update() for _ in ALL_BLOCKS] + [_update(), _update(), _html_message(str(exc), "error")]
        return self._slider_updates(arch, values) + [
            _update(value=format_block_weights(values, arch)), self.curve(arch, values), _html_message("weights applied")
        ]

    def curve(self, arch: str, values: dict[str, float]):
        return block_curve(get_arch(arch).blocks, [values[b] for b in get_arch(arch).blocks])


def _clamp(v: float) -> float:
    return min(1.0, max(0.0, float(v)))
