"""``python -m lib_merge board``: the Merge Board in its own gradio app over a folder of checkpoints.

The folder decides the host: ``ToyHost`` (a sampler that draws toy models, so the live preview
shows images) when it holds a toy checkpoint, else the plain ``StandaloneHost`` (no sampler)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .host_standalone import MODEL_SUFFIXES, StandaloneHost  # noqa: F401  (the module's public names)


def make_host(models_dir: Path, *, lora_dir: Optional[Path] = None) -> StandaloneHost:
    from .host_toy import ToyHost, holds_toy_models

    plain = StandaloneHost(models_dir, lora_dir=lora_dir)
    if holds_toy_models(c.path for c in plain.checkpoints()):
        return ToyHost(models_dir, lora_dir=lora_dir)
    return plain


def launch(models_dir: Optional[Path] = None, *, host: str = "127.0.0.1", port: int = 7870,
           open_browser: bool = False, block: bool = True, lora_dir: Optional[Path] = None):
    """Build the board over ``models_dir`` (default: the demo folder, filled on first use, with the
    shipped toy models when the package has them) and serve it."""
    from ...demo import ensure_demo_models
    from ...toy.demo_grid import copy_pretrained
    from . import ui as board_mod
    from .assets import read_asset
    from .gradio_compat import gradio_major

    if models_dir is None:
        models_dir = Path("demo_models")
        ensure_demo_models(models_dir)
        copy_pretrained(models_dir)
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise SystemExit(f"error: models folder {models_dir} does not exist")
    standalone = make_host(models_dir, lora_dir=lora_dir)
    css, js = read_asset("style.css"), read_asset("javascript/merge_board.js")
    demo, board = board_mod.build(standalone, standalone=True)
    demo.css = css  # read by gradio at launch on both 3.41 and 4.x
    if js:
        _add_js(demo, js)
    demo.queue(default_concurrency_limit=None) if gradio_major() >= 4 else demo.queue(concurrency_count=8)
    sampler = " (toy models: the live preview draws them)" if standalone.has_sampler else ""
    print(f"Merge Board over {models_dir.resolve()}{sampler} on http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=not block,
                show_api=False)
    return demo, board


def _add_js(demo, js: str) -> None:
    """Run the board's client script once the page has loaded (gradio 3: ``_js`` on a load event;
    gradio 4: ``Blocks.js``-style load handler)."""
    from .gradio_compat import _js_kwargs

    code = "() => {\n" + js + "\nif (window.mergeboardSetup) window.mergeboardSetup();\n}"
    with demo:
        demo.load(None, None, None, **_js_kwargs(code))
