"""The board's LoRA handlers: the picker over the host's LoRA folder, the LoRA list (one line each:
``TITLE | STRENGTH | BLOCK WEIGHTS``), and Extract LoRA (B − A into the LoRA folder).

The list is part of the board's recipe (its ``loras``): the live preview bakes it into the loaded
model exactly as Save bakes it into the file (``lib_merge.live.loras``), so changing a line
re-patches only the keys that LoRA touches. What the loaded model does not hold (Forge's text
encoders, the VAE) is changed in the saved file only, and the status line says so.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Optional

from ...errors import MergeError, OutputPathError
from .base import BoardBase, _num
from .gradio_compat import _html_message, _update
from .host import output_path

LIVE_AND_SAVE = ("The LoRAs of the list are baked into the live preview and into Save alike (text encoders "
                 "the preview does not hold, e.g. on Forge, change in the saved file only; the status says so).")


class LoraHandlers(BoardBase):
    """LoRA picker, the LoRA list (live preview and Save) and Extract LoRA (no gradio layout here)."""

    def lora_titles(self) -> list[str]:
        loras = getattr(self.host, "loras", None)
        return [c.title for c in loras()] if loras else []

    def on_lora_refresh(self, current: Optional[str] = None):
        titles = self.lora_titles()
        return _update(choices=titles, value=current if current in titles else None)

    def on_lora_add(self, title: Optional[str], strength: Any, weights: Optional[str], listing: Optional[str]):
        """Append one LoRA line to the Save list; returns (new list, message)."""
        if not title:
            return _update(), _html_message("pick a LoRA to add (from the LoRA folder; Refresh re-reads it)", "warn")
        line = f"{title} | {_num(strength, 1.0):g}" + (f" | {weights.strip()}" if weights and weights.strip() else "")
        text = "\n".join([ln for ln in (listing or "").splitlines() if ln.strip()] + [line])
        return text, _html_message(f"added {title} to the LoRA list. {LIVE_AND_SAVE}")

    def recipe(self, ui, **kwargs):
        """The board's recipe with the LoRA list as its ``loras`` (raises MergeError naming a bad line)."""
        recipe = super().recipe(ui, **kwargs)
        entries = self.lora_entries(ui.loras)
        return recipe.replace(loras=entries) if entries else recipe

    def lora_entries(self, listing: Optional[str]) -> tuple[dict, ...]:
        """The LoRA list as the recipe's ``loras`` (raises MergeError naming the bad line)."""
        if not (listing or "").strip():
            return ()  # no folder scan on every slider move of a board without LoRAs
        files = {}
        loras = getattr(self.host, "loras", None)
        if loras:
            files = {c.title: c.path for c in loras()}
        out = []
        for number, line in enumerate((listing or "").splitlines(), 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) > 3 or not parts[0]:
                raise MergeError(f"LoRA line {number} ({line.strip()!r}): write 'NAME | STRENGTH | BLOCK WEIGHTS'")
            path = files.get(parts[0])
            if path is None:
                raise MergeError(f"LoRA {parts[0]!r} (line {number}) is not in the LoRA folder; press Refresh or remove it")
            try:
                strength = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
            except ValueError:
                raise MergeError(f"LoRA line {number}: strength {parts[1]!r} is not a number") from None
            weights = parts[2] if len(parts) > 2 and parts[2] else None
            out.append({"path": str(path), "sha256": "", "strength": strength, "weights": weights})
        return tuple(out)

    def on_extract(self, a_title: Optional[str], b_title: Optional[str], rank: Any, name: Optional[str],
                   overwrite: bool, progress=None):
        """A LoRA of B − A (kohya layout, exact SVD) written into the LoRA folder; returns
        (LoRA picker update, message)."""
        from ...lora.extract import ExtractOptions, extract_lora

        try:
            a, b = self.path_of(a_title), self.path_of(b_title)
            if a is None or b is None:
                raise MergeError("pick models A (the base) and B (the fine-tune) to extract a LoRA of B − A")
            settings = self.host.settings()
            folder = settings.lora_dir
            if folder is None:
                raise MergeError("this host has no LoRA folder")
            folder.mkdir(parents=True, exist_ok=True)
            path = output_path(folder, name or "")
            if path.exists() and not overwrite:
                raise OutputPathError(f"{path.name} already exists in {folder}; tick 'Overwrite' or choose another name")
            if progress is not None:
                progress(0.0, desc=f"extracting {path.name}")
            report = extract_lora(a, b, path, ExtractOptions(rank=int(_num(rank, 64)), threads=settings.threads or 2),
                                  overwrite=bool(overwrite))
        except MergeError as exc:
            return _update(), _html_message(str(exc), "error")
        except Exception as exc:
            traceback.print_exc()
            return _update(), _html_message(f"extract failed: {type(exc).__name__}: {exc}; no file was written", "error")
        kept = sum(k for k, _ in report.energy.values())
        total = sum(t for _, t in report.energy.values())
        share = f", {kept / total:.1%} of ‖B−A‖² kept" if total else ""
        self.log(f"[Merge Board] extracted {report.path}: {report.modules} modules, rank {max(report.ranks, default=0)}"
                 f"{share}, {report.seconds:.1f} s")
        return (self.on_lora_refresh(Path(report.path).relative_to(folder).as_posix()),
                _html_message(f"extracted {report.path.name} ({report.modules} modules{share}) in {report.seconds:.1f} s "
                              f"to {folder}"))
