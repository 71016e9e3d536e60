"""The standalone host: the Merge Board over a folder of checkpoints, in its own gradio app
(``python -m lib_merge board``, served by ``standalone.launch``). Merging, saving, inspecting and
the plots work; there is no sampler, so the image preview and the live-preview switch are hidden
— unless the folder holds toy models, where ``host_toy.ToyHost`` (a subclass) draws them."""
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
