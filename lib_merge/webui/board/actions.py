"""Handlers that act on the board's recipe: follow it in the live session, switch live preview,
render a preview, compare A and B, save the merge (with progress and cancel), and fill the
controls back from a merged file's embedded recipe.

They are the board's only paths to the engine, the inspector, the host's sampler and the disk,
so their error handling (a clear sentence in the status line, never a traceback in the UI) is
kept together here.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Any, Optional

from ...blocks import parse_block_weights
from ...errors import MergeCancelled, MergeError, OutputPathError
from ...methods import get_method
from .base import LETTERS, NO_VAE, BoardBase, _num
from .gradio_compat import _html_message, _update
from .plots import heatmap
from .host import PreviewRequest, output_path


class ActionHandlers(BoardBase):
    """Handlers with side effects (session, sampler, inspector, engine, files)."""

    def on_change(self, *values):
        """Any recipe control changed: the session (the generation hook's view) follows."""
        try:
            recipe = self.recipe(self.parse_ui(values))
        except MergeError as exc:  # the session keeps the last valid recipe
            return _html_message(str(exc), "warn")
        except Exception as exc:  # a half-typed value: say it, keep going
            return _html_message(f"{type(exc).__name__}: {exc}", "warn")
        self.session.set_board(recipe)
        return _html_message(self.session.status_line())

    def on_live(self, enabled: bool, *values):
        """The live-preview switch: on validates now and patches at the next generation; off
        restores A right away (under the host's queue lock)."""
        self.session.set_enabled(bool(enabled))
        if not enabled:
            lock = self.host.mutation_lock()
            # Weights cannot be restored under a running sampler, but the switch must answer now:
            # waiting for the lock left the real A1111's status at "Live preview on" until the
            # generation ended. Restore on a thread that waits for the lock instead.
            if not lock.acquire(blocking=False):
                threading.Thread(target=self._restore_when_free, args=(lock,), daemon=True,
                                 name="mergeboard-restore").start()
                return _html_message("Live preview off. Model A is restored as soon as the running generation ends.")
            try:
                report = self.session.restore()
            except Exception as exc:
                return _html_message(f"could not restore model A: {exc}", "error")
            finally:
                lock.release()
            text = "Live preview off." + (f" Restored model A ({report.keys} tensors)." if report and report.keys else "")
            return _html_message(text)
        try:
            recipe = self.recipe(self.parse_ui(values))
        except MergeError as exc:
            return _html_message(f"Live preview on, but the board is not ready: {exc}", "warn")
        self.session.set_board(recipe)
        if getattr(self.host, "live_images", False):  # it loads model A itself at each render
            return _html_message("Live preview on: the image follows every change of the merge, the prompt and "
                                 "the settings (model A is restored when you switch it off).")
        loaded = self.host.loaded_checkpoint()
        notes = []
        if loaded is None:
            notes.append("No model is loaded yet: the merge is applied at the first generation.")
        elif not _same_file(loaded, recipe.models[0]):
            return _html_message(
                f"Live preview merges into the loaded model ({Path(loaded).name}); set model A to it "
                "(or load A in the WebUI) — no generation is changed until then.", "warn")
        return _html_message(" ".join(["Live preview on: every txt2img generation uses this merge (patched just "
                                       "before sampling, restored when you switch it off)."] + notes))

    def _restore_when_free(self, lock) -> None:
        with lock:
            if self.session.enabled:  # switched back on meanwhile: the next generation patches anyway
                return
            try:
                self.session.restore()
            except Exception as exc:  # no page to answer: the console is where it can be seen
                print(f"[Merge Board] could not restore model A: {exc}")

    def on_preview(self, prompt, negative, seed, steps, width, height, cfg, *values,
                   sampler: Optional[str] = None, options: Optional[dict] = None):
        """Render one preview; ``sampler`` and ``options`` come from the controls a host offers
        beyond the common ones (the toy host's sampler and guidance knobs)."""
        if not self.host.has_sampler:
            return None, "", _html_message("this host has no sampler: preview is unavailable", "warn")
        try:
            recipe = self.recipe(self.parse_ui(values))
            self.session.set_board(recipe)
            request = PreviewRequest(prompt or "", negative or "", int(_num(seed, -1)), int(_num(steps, 20)),
                                     int(_num(width, 512)), int(_num(height, 512)), float(_num(cfg, 7.0)),
                                     options={k: _num(v, 0.0) for k, v in (options or {}).items()})
            if sampler:
                request.sampler = sampler
            result = self.host.run_preview(request, self.session)
        except MergeError as exc:
            return None, "", _html_message(str(exc), "error")
        except Exception as exc:
            traceback.print_exc()
            return None, "", _html_message(f"preview failed: {type(exc).__name__}: {exc}", "error")
        return result.image, result.infotext, _html_message(self.session.status_line())

    def on_live_image(self, enabled, *args, sampler: Optional[str] = None, options: Optional[dict] = None):
        """A host that draws its own previews (``live_images``), Live preview on: any change renders
        the image again. One slider release changes many controls at once and each fires an event,
        so of the renders that queue up behind the one running, only the newest is drawn."""
        keep = (_update(), _update(), _update())
        if not enabled or not getattr(self.host, "live_images", False):
            return keep
        with self._render_turn_lock:
            self._render_turn += 1
            turn = self._render_turn
        with self._render_lock:
            if turn != self._render_turn:
                return keep
            return self.on_preview(*args, sampler=sampler, options=options)

    def on_compare(self, a_title, b_title, progress=None):
        """Per-block relative difference and cosine of A vs B (the inspector), as a heatmap."""
        from ...inspect import inspect_models

        try:
            a, b = self.path_of(a_title), self.path_of(b_title)
            if a is None or b is None:
                raise MergeError("pick models A and B to compare")
            done = [0]

            def tick(n, total):
                if progress is not None and (n - done[0] > total // 50 or n == total):
                    done[0] = n
                    progress(n / max(total, 1), desc="comparing A and B")

            result = inspect_models(str(a), str(b), progress=tick)
        except MergeError as exc:
            return None, _html_message(str(exc), "error")
        return heatmap(result), _html_message(f"compared {Path(a).name} with {Path(b).name}")

    def on_save(self, name, dtype, vae_title, overwrite, *values, progress=None, loras: Optional[str] = None):
        """Write the board's recipe with the streaming engine into the checkpoint folder, with the
        LoRAs of the Save list (``LoraHandlers.lora_entries``) baked in."""
        from ...engine import merge

        session = self.session
        if session.save.running:
            return _html_message(f"a save is already running ({session.save.name}); wait or cancel it", "warn")
        try:
            settings = self.host.settings()
            folder = settings.output_dir
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
            path = output_path(folder, name)
            vae = None
            if vae_title and vae_title != NO_VAE:
                vae = next((str(v.path) for v in self.host.vaes() if v.title == vae_title), None)
                if vae is None:
                    raise MergeError(f"VAE {vae_title!r} is not in the list any more; press Refresh")
            recipe = self.recipe(self.parse_ui(values), dtype=dtype or settings.dtype, vae=vae)
            if loras and loras.strip():
                recipe = recipe.replace(loras=self.lora_entries(loras))
            if path.exists() and not overwrite:
                raise OutputPathError(f"{path.name} already exists in {folder}; tick 'Overwrite' or choose another name")
            inputs = list(recipe.models) + ([vae] if vae else []) + [lora["path"] for lora in recipe.loras]
            if any(_same_file(path, m) for m in inputs):
                raise OutputPathError(f"{path.name} is an input of this merge; choose another name")
        except MergeError as exc:
            return _html_message(str(exc), "error")
        self._cancel.clear()
        session.save.running, session.save.name, session.save.fraction = True, path.name, 0.0

        def report(done: int, total: int, key: str) -> None:
            session.save.fraction = done / max(total, 1)
            if progress is not None:
                progress(session.save.fraction, desc=f"saving {path.name}")

        import torch

        threads_before = torch.get_num_threads()
        try:
            # The recipe carries the VAE to bake: the engine does it, so the file's recipe reproduces it.
            result = merge(recipe, path, threads=settings.threads or None, overwrite=bool(overwrite),
                           progress=report, cancel=self._cancel)
        except MergeCancelled:
            self.log(f"[Merge Board] save of {path.name} cancelled; no file was written")
            return _html_message(f"save cancelled; no file was written ({path.name})", "warn")
        except MergeError as exc:
            return _html_message(f"save failed: {exc}", "error")
        except Exception as exc:
            traceback.print_exc()
            return _html_message(f"save failed: {type(exc).__name__}: {exc}; no file was written", "error")
        finally:
            session.save.running = False
            # The engine's workers call torch.set_num_threads(1); torch stores that count for every
            # thread initialised afterwards, which would leave the host's next generation threads
            # single-threaded (and numerically different). Put the process default back.
            torch.set_num_threads(threads_before)
        try:
            self.host.after_save(result.path)
        except Exception as exc:
            return _html_message(f"saved {result.path} but the checkpoint list did not refresh ({exc})", "warn")
        self.checkpoints(refresh=True)
        short = f" [{result.short_hash}]" if result.short_hash else ""
        baked = f", {len(recipe.loras)} LoRA(s) baked" if recipe.loras else ""
        self.log(f"[Merge Board] saved {result.path}{short}: {recipe.method}, {len(recipe.models)} models{baked}, "
                 f"{result.bytes_written / 2**20:.0f} MiB in {result.seconds:.1f} s")
        return _html_message(f"saved {result.path.name}{short}{baked} in {result.seconds:.1f} s to {result.path.parent}; "
                             "it is in the checkpoint list now")

    def on_cancel(self):
        self._cancel.set()
        return _html_message("cancelling the save…", "warn")

    def on_load_recipe(self, title: Optional[str]):
        """Fill the board from the recipe embedded in a merged file."""
        from ...recipe import load_recipe

        n_out = len(LETTERS) + 5 + len(self.param_names)
        try:
            path = self.path_of(title)
            if path is None:
                raise MergeError("pick a merged model to load its recipe from")
            recipe = load_recipe(path)
            method = get_method(recipe.method)
        except MergeError as exc:
            return [_update() for _ in range(n_out)] + self._unchanged_blocks() + [_html_message(str(exc), "error")]
        titles = []
        for ref in recipe.models:
            t = self.title_of(Path(ref)) if Path(ref).exists() else None
            titles.append(t or ref)
        titles += [None] * (len(LETTERS) - len(titles))
        missing = [Path(r).name for r, t in zip(recipe.models, titles) if t == r and Path(r).suffix]
        a_arch = self.arch_name(titles[0]) if titles[0] else "sd1"
        alpha = recipe.alpha if recipe.alpha is not None else 0.5
        out = [_update(value=t) for t in titles[: len(LETTERS)]]
        out += [_update(value=method.name), _update(value=alpha), _update(value=recipe.beta if recipe.beta is not None else 0.5),
                _update(value=recipe.seed), _update(value=recipe.dtype)]
        for name in self.param_names:
            out.append(_update(value=recipe.params[name]) if name in recipe.params else _update())
        # the blocks go through the same path as every other change: string, sliders, curve, preset label
        out += self.block_state(a_arch, parse_block_weights(recipe.weights, a_arch, base=alpha))
        note = f"loaded the recipe of {Path(path).name}"
        if missing:
            note += f"; missing models: {', '.join(missing)}"
        self.log(f"[Merge Board] {note}")
        return out + [_html_message(note, "warn" if missing else "info")]


def _same_file(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False
