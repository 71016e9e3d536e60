"""The standalone host: the Merge Board over a folder of checkpoints, in its own gradio app
(``python -m lib_merge board``). Merging, saving, inspecting and the plots work; there is no
sampler, so the image preview and the live-preview switch are hidden."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from .host import BoardSettings, Checkpoint, PreviewRequest, PreviewResult, scan_loras

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".sft")


class StandaloneHost:
    name = "standalone"
    has_sampler = False

    def __init__(self, models_dir: Path, *, dtype: str = "fp16", threads: int = 0, lora_dir: Optional[Path] = None):
        self.models_dir = Path(models_dir)
        # LoRAs: --lora-dir, else the loras/ subfolder of the models folder (left out of the checkpoints)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else self.models_dir / "loras"
        self._settings = BoardSettings(checkpoint_dir=self.models_dir, dtype=dtype, threads=threads,
                                       lora_dir=self.lora_dir)
        self._lock = threading.Lock()

    def _scan(self, vae: bool) -> list[Checkpoint]:
        found = []
        if not self.models_dir.is_dir():
            return found
        loras = self.lora_dir.resolve()
        for path in sorted(self.models_dir.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in MODEL_SUFFIXES:
                continue
            if loras in path.resolve().parents:
                continue
            rel = path.relative_to(self.models_dir)
            is_vae = ".vae." in path.name.lower() or (rel.parts and rel.parts[0].lower() == "vae")
            if is_vae == vae:
                found.append(Checkpoint(rel.as_posix(), path))
        return found

    def checkpoints(self, refresh: bool = False) -> list[Checkpoint]:
        return self._scan(vae=False)

    def vaes(self) -> list[Checkpoint]:
        return self._scan(vae=True)

    def loras(self) -> list[Checkpoint]:
        return scan_loras(self.lora_dir)

    def loaded_checkpoint(self) -> Optional[Path]:
        return None

    def live_target(self):
        return None

    def mutation_lock(self):
        return self._lock

    def settings(self) -> BoardSettings:
        return self._settings

    def notes(self) -> list[str]:
        return [f"Standalone board over {self.models_dir.resolve()}: merge, inspect, plot and save. "
                "There is no sampler here, so the image preview is hidden; install the extension in A1111 or "
                "Forge for live previews."]

    def after_save(self, path: Path) -> None:
        """The folder is rescanned on every listing: nothing to do."""

    def run_preview(self, request: PreviewRequest, session) -> PreviewResult:
        raise RuntimeError("the standalone board has no sampler")


def launch(models_dir: Optional[Path] = None, *, host: str = "127.0.0.1", port: int = 7870,
           open_browser: bool = False, block: bool = True, lora_dir: Optional[Path] = None):
    """Build the board over ``models_dir`` (default: the demo folder, filled on first use) and serve it."""
    from ...demo import ensure_demo_models
    from . import ui as board_mod
    from .assets import read_asset
    from .gradio_compat import gradio_major

    if models_dir is None:
        models_dir = Path("demo_models")
        ensure_demo_models(models_dir)
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise SystemExit(f"error: models folder {models_dir} does not exist")
    standalone = StandaloneHost(models_dir, lora_dir=lora_dir)
    css, js = read_asset("style.css"), read_asset("javascript/merge_board.js")
    demo, board = board_mod.build(standalone, standalone=True)
    demo.css = css  # read by gradio at launch on both 3.41 and 4.x
    if js:
        _add_js(demo, js)
    demo.queue(default_concurrency_limit=None) if gradio_major() >= 4 else demo.queue(concurrency_count=8)
    print(f"Merge Board over {models_dir.resolve()} on http://{host}:{port}", flush=True)
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
