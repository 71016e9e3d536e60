"""The live-preview session: board state plus the live merge of the host's loaded model, between
the host's generation hooks, the board and ``lib_merge.live``.

Threading: tab handlers take ``host.mutation_lock()`` (A1111/Forge: ``call_queue.queue_lock``)
around every weight mutation; generation hooks already run under that lock and must never take
it again (it is not re-entrant), so ``LiveSession.sync`` only takes the session's own lock.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ...errors import MergeError
from ...recipe import Recipe
from .host import INFOTEXT_RECIPE, Host, recipe_infotext


@dataclass
class SaveStatus:
    running: bool = False
    name: str = ""
    fraction: float = 0.0


class LiveSession:
    """Board state plus the live merge of the host's loaded model.

    ``board_recipe`` is the board's current recipe (updated by the tab on every change);
    ``enabled`` is the "Live preview" switch. ``sync(overrides)`` brings the loaded model to the
    recipe the next generation should see — the board's (when enabled or forced) with X/Y/Z
    overrides applied — or back to A. It is called from generation hooks (no queue lock) and
    from the tab (under ``host.mutation_lock()``).
    """

    def __init__(self, host: Host, log: Callable[[str], None] = print):
        self.host = host
        self.log = log
        self.board_recipe: Optional[Recipe] = None
        self.enabled = False
        self.live = None  # lib_merge.live.LiveMerge
        self.message = ""
        self.last_recipe: Optional[Recipe] = None  # what the model holds after the last sync
        self.save = SaveStatus()
        self._lock = threading.RLock()
        self._infotext_keys: set[str] = set()
        self._last_note: tuple[int, str] | None = None

    # -- board side ----------------------------------------------------------------------------------
    def set_board(self, recipe: Optional[Recipe]) -> None:
        with self._lock:
            self.board_recipe = recipe

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            self.enabled = bool(enabled)

    # -- recipes ---------------------------------------------------------------------------------------
    def desired(self, overrides: Optional[Mapping[str, Any]] = None, *, force: bool = False) -> Optional[Recipe]:
        """The recipe the model should hold now, or None for A."""
        if not overrides and not (self.enabled or force):
            return None
        recipe = self.board_recipe
        if recipe is None:
            raise MergeError(
                "the Merge Board has no recipe yet: open the Merge Board tab and pick model B "
                "(X/Y/Z merge axes vary the board's recipe)"
            )
        if overrides:
            from .xyz import apply_overrides

            recipe = apply_overrides(recipe, overrides, self.host)
        return recipe

    # -- the model -------------------------------------------------------------------------------------
    def sync(self, overrides: Optional[Mapping[str, Any]] = None, *, force: bool = False, to_a: bool = False):
        """Patch (or restore) the loaded model to ``desired(overrides)`` (``to_a``: to model A);
        returns the LiveReport."""
        from ...live import LiveMerge, LiveMergeError

        with self._lock:
            recipe = None if to_a else self.desired(overrides, force=force)
            self.last_recipe = recipe
            target = self.host.live_target()
            if self.live is not None and (target is None or not self.live.matches(target)):
                # The host swapped or unloaded the model object: the patched one is gone.
                self.live.invalidate()
                self.live.close()
                self.live = None
            if recipe is None:
                return self._logged(self.live.restore(), "restored model A") if self.live is not None else None
            if target is None:
                raise LiveMergeError(
                    "no model is loaded in the WebUI; load model A (or generate once) before the live preview"
                )
            loaded = self.host.loaded_checkpoint()
            if loaded is None:
                raise LiveMergeError("the WebUI does not say which checkpoint is loaded; reload it and try again")
            if self.live is None:
                self.live = LiveMerge(target, loaded, cache_limit_bytes=self.host.settings().cache_limit_bytes)
            try:
                report = self.live.apply(recipe)
            except MergeError as exc:
                self.message = str(exc)
                raise
            self.message = report.summary()
            return self._logged(report)

    # -- generation hooks (already under the host's queue lock: never take it here) ---------------------
    def before_generation(self, p: Any) -> None:
        """Bring the model to what this generation should see: the board's merge when live preview
        is on, plus an X/Y/Z cell's overrides; write the recipe into the infotext. A generation
        whose loaded model is not the board's A (another checkpoint, a hires-fix checkpoint) is left
        alone, with one console line."""
        from .xyz import OVERRIDE_ATTR, infotext_items

        overrides = getattr(p, OVERRIDE_ATTR, None) or None
        params = getattr(p, "extra_generation_params", None)
        if params is not None:  # X/Y/Z cells share this dict: clear what an earlier cell wrote
            for key in self._infotext_keys:
                params.pop(key, None)
        with self._lock:
            if not overrides and self.enabled and self.board_recipe is None:
                self._note(p, "[Merge Board] live preview is on but the board has no valid recipe yet: "
                           "this generation runs without the live merge")
                self.sync(to_a=True)
                if params is not None:
                    params["Merge Board"] = "skipped (the board is not ready)"
                    self._infotext_keys.add("Merge Board")
                return
            recipe = self.desired(overrides)
            loaded = self.host.loaded_checkpoint()
            if recipe is not None and loaded is not None and not _same_path(loaded, recipe.models[0]):
                self._note(p, f"[Merge Board] {Path(loaded).name} is loaded, not model A "
                              f"({Path(recipe.models[0]).name}): this generation runs without the live merge")
                self.message = (f"the last generation ran without the merge: {Path(loaded).name} is loaded, not "
                                f"model A — pick it as A (Refresh re-reads the lists) or load A")
                if self.live is not None:
                    self.sync(to_a=True)
                if params is not None:
                    params["Merge Board"] = "skipped (loaded model is not A)"
                    self._infotext_keys.add("Merge Board")
                return
            try:
                self.sync(overrides)
            except MergeError as exc:
                # A refusal (e.g. fp8 weights) is the user's to read, not a traceback: the host's
                # script runner would print one and make the image without the merge anyway.
                # A refusal before any write (a damaged LoRA, a missing B) leaves the previous merge
                # in place; put A back so the image is what its infotext says: made without it.
                if self.live is not None and self.live.is_patched:
                    try:
                        self.sync(to_a=True)
                    except MergeError:
                        pass  # the model itself is unusable (unloaded, fp8): nothing was patched into it
                self._note(p, f"[Merge Board] this generation runs without the live merge: {exc}")
                if params is not None:
                    params["Merge Board"] = "skipped (see the console)"
                    self._infotext_keys.add("Merge Board")
                return
        if recipe is not None and params is not None:
            items = {INFOTEXT_RECIPE: recipe_infotext(recipe)}
            items.update(infotext_items(overrides or {}))
            params.update(items)
            self._infotext_keys.update(items)

    def _note(self, p: Any, message: str) -> None:
        """One console line per generation: the hooks call ``before_generation`` more than once."""
        if self._last_note != (id(p), message):
            self._last_note = (id(p), message)
            self.log(message)

    def after_generation(self, p: Any, grid_finished: bool) -> None:
        """After an X/Y/Z cell: when it was the grid's last one, go back to the board's state."""
        from .xyz import OVERRIDE_ATTR

        if getattr(p, OVERRIDE_ATTR, None) and grid_finished:
            with self._lock:
                self.sync(None)

    def restore(self):
        """Put A back (tab side: call under ``host.mutation_lock()``)."""
        with self._lock:
            if self.live is None:
                return None
            report = self._logged(self.live.restore(), "restored model A")
            self.message = "restored model A" if report.keys else self.message
            return report

    def _logged(self, report, what: str = ""):
        """One console line per patch or restore that wrote weights (generation, preview, the tab)."""
        if report is not None and report.keys:
            text = f"{what} ({report.keys} tensors in {report.seconds * 1000:.0f} ms)" if what else report.summary()
            self.log(f"[Merge Board] {text}")
        return report

    def model_loaded(self, model_object: Any = None) -> None:
        """The host loaded weights (another checkpoint or a reload). A patched object that is still
        alive elsewhere (A1111 keeps several models with sd_checkpoints_limit > 1) is restored; if
        the weights were reloaded into the patched object itself, they are A's again: drop state."""
        with self._lock:
            live = self.live
            if live is None:
                return
            owner = getattr(live.target, "owner", None)
            if owner is not None and model_object is not None and owner is model_object:
                loaded = self.host.loaded_checkpoint()
                if loaded is not None and _same_path(loaded, live.model_a) and live.holds_patch():
                    return  # only another part was reloaded (A1111's VAE): the merge is still in place
                live.invalidate()
            else:
                try:
                    live.restore()
                except Exception as exc:  # the old object may already be on the meta device
                    self.log(f"[Merge Board] could not restore the previous model ({exc}); dropped its live state")
                    live.invalidate()
            live.close()
            self.live = None
            if self.enabled:
                self.message = "the checkpoint changed: live preview re-applies at the next generation"

    def shutdown(self) -> None:
        """Reload UI / exit: leave the model as A."""
        with self._lock:
            if self.live is not None:
                try:
                    self.live.restore()
                finally:
                    self.live.close()
                    self.live = None

    @property
    def patched(self) -> bool:
        return self.live is not None and self.live.is_patched

    def status_line(self) -> str:
        state = "on" if self.enabled else "off"
        parts = [f"Live preview {state}."]
        if self.live is not None and self.live.is_patched:
            parts.append(f"Model patched in {len(self.live.patched_blocks)} block(s).")
        if self.message:
            parts.append(self.message)
        if self.save.running:
            parts.append(f"Saving {self.save.name} ({self.save.fraction:.0%}); generations run alongside — the save reads files only.")
        return " ".join(parts)


def _same_path(a: Any, b: Any) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


