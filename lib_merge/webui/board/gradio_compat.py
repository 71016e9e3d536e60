"""The board's only contact with gradio's version differences (3.41 in A1111, 4.x in Forge and the
standalone app): gradio is imported lazily, updates go through ``gr.update`` and client-side code
through ``_js`` or ``js`` by major version, so no other board module needs to know which one runs."""
from __future__ import annotations


def _gr():
    import gradio as gr

    return gr


def gradio_major() -> int:
    try:
        return int(_gr().__version__.split(".")[0])
    except Exception:
        return 3


def _update(**kwargs):
    return _gr().update(**kwargs)


def _js_kwargs(js: str | None) -> dict:
    if not js:
        return {}
    return {"js": js} if gradio_major() >= 4 else {"_js": js}


def _html_message(text: str, kind: str = "info") -> str:
    import html

    return f"<div class='mergeboard-msg mergeboard-{kind}'>{html.escape(text)}</div>"
