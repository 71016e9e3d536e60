"""The Untitled Guidance script's gradio side: the controls' layout, and how they are wired to
paste and to the "Send to" buttons.

No gradio import at module level (``build_ui`` takes the ``gradio`` module as an argument), so
this imports in tests and on both hosts.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ...errors import BadParameterError
from ...guidance.settings import GuidanceSettings
from .controls import COMBINER_METHODS, CONTROL_BY_NAME, CONTROLS, METHOD_SWITCH
from .console import TITLE
from .paste import PasteCache

HINT = (
    "**Untitled** samples with no prompt at all (the prompt and negative are ignored) to show what the "
    "model has learned. With *empty* (SD1.x) or *zero*, prompt and negative are the same conditioning, "
    "so CFG alone does nothing: use **CFG scale 1 with PAG (3–5) or SEG (3, σ = ∞)**, 2 model rows per "
    "image and step. CFG++ needs one of the *CFG++* samplers and replaces the CFG scale by λ. Windows: a "
    "step index (0-based) or a fraction 0–1 of the run; both ends inclusive; 2048 means to the end."
)


# Sections of the frontier methods, each a collapsed accordion inside ours: (title, method groups).
SECTIONS = (
    ("Alternative combiners (one at a time)", ("apg", "cfgzero", "tcfg", "mahiro", "skimmed", "fdg")),
    ("NAG and CFG interval", ("nag", "cfg_interval")),
)
# Switches whose combination ``GuidanceSettings.conflict`` may refuse.
CONFLICT_INPUTS = ("cfgpp_enabled", "cfg_interval") + tuple(f"{m}_enabled" for m in COMBINER_METHODS)


def build_ui(gr, elem_id: Callable[[str], str], extras: dict | None = None) -> list:
    """Create the controls inside the caller's gradio Blocks context; returns them in ``CONTROLS`` order.

    Only the portable gradio subset (3.41 and 4.x): Accordion, Group, Row, Markdown, Checkbox,
    Slider, Number, Dropdown, Textbox; values and ``info`` tooltips, no ``.style()``. ``extras``, if
    given, receives the non-control components by name (``"conflict"``: the Markdown line that
    ``connect_conflict_message`` fills).
    """
    made: dict[str, Any] = {}

    def make(name: str):
        c = CONTROL_BY_NAME[name]
        kwargs = dict(label=c.label, elem_id=elem_id(name))
        if c.info:
            kwargs["info"] = c.info
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

    def group(method: str) -> None:
        with gr.Group():
            switch = METHOD_SWITCH[method]
            hires = f"{method}_hires"
            with gr.Row():
                make(switch)
                make(hires)
            rest = [n for n in groups[method] if n not in (switch, hires)]
            for i in range(0, len(rest), 3):
                with gr.Row():
                    for name in rest[i:i + 3]:
                        make(name)

    in_sections = {m for _, methods in SECTIONS for m in methods}
    with gr.Accordion(TITLE, open=False, elem_id=elem_id("accordion")):
        gr.Markdown(HINT)
        with gr.Row():
            make("untitled")
        for method in groups:
            if method != "untitled" and method not in in_sections:
                group(method)
        conflict = None
        for i, (title, methods) in enumerate(SECTIONS):
            with gr.Accordion(title, open=False, elem_id=elem_id(f"section_{i}")):
                if i == 0:
                    conflict = gr.Markdown("", elem_id=elem_id("conflict"))
                for method in methods:
                    group(method)
    if extras is not None:
        extras["conflict"] = conflict
    return [made[c.name] for c in CONTROLS]


def conflict_message(*values: Any) -> str:
    """The Markdown line for the switches of ``CONFLICT_INPUTS`` (in that order): the settings'
    own conflict message, or "" when they can run together."""
    picked = dict(zip(CONFLICT_INPUTS, (bool(v) for v in values)))
    fields = {name: on for name, on in picked.items() if name != "cfgpp_enabled"}
    fields["cfgpp"] = CONTROL_BY_NAME["cfgpp"].default if picked.get("cfgpp_enabled") else 0.0
    try:
        GuidanceSettings(**fields)
    except BadParameterError as err:
        return f"**⚠ {err}** (a generation stops with this message)"
    return ""


def connect_conflict_message(components: Sequence[Any], markdown: Any) -> None:
    """Show the conflict message as soon as the user ticks a second combiner (and never drop one
    silently: ``process`` refuses the same settings with the same message)."""
    by_name = dict(zip((c.name for c in CONTROLS), components))
    inputs = [by_name[name] for name in CONFLICT_INPUTS]
    if markdown is None or not all(hasattr(c, "change") for c in inputs):
        return  # a gradio without events (the tests' recording stand-in): nothing to connect
    for comp in inputs:
        comp.change(fn=conflict_message, inputs=inputs, outputs=[markdown], show_progress=False)


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
