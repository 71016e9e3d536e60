"""What every group of board handlers stands on: the host's checkpoint list, a picker's title
resolved to its file and architecture, and the controls' values turned into a ``Recipe``.

Kept apart from the handlers so the rules for a valid board recipe (models present, one
architecture, parameters coerced by the method registry) live in one place; ``sync``
and ``actions`` extend ``BoardBase`` and ``ui.Board`` combines them.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ...arch.spec import SD1, get_arch
from ...blocks import format_block_weights, parse_block_weights
from ...errors import MergeError
from ...methods import all_methods, get_method
from ...recipe import Recipe
from .host import Checkpoint, Host, arch_cache, filter_by_arch
from .live_session import LiveSession

LETTERS = "ABCDEF"
ALL_BLOCKS = SD1.blocks  # 26 names; SDXL's 20 are a subset
NO_VAE = "None (keep A's VAE)"


@dataclass
class UiValues:
    """The recipe-relevant control values, in the order of ``Board.recipe_inputs``."""

    models: list[Optional[str]]
    method: str
    alpha: float
    beta: float
    weights: str
    seed: int
    params: dict[str, Any]
    loras: str = ""  # the LoRA list (``LoraHandlers.lora_entries``), after the parameters when the UI passes it


class BoardBase:
    """Checkpoint lookup and recipe building shared by every handler (no gradio here)."""

    def __init__(self, host: Host, session: Optional[LiveSession] = None):
        self.host = host
        self.session = session or LiveSession(host)
        self.methods = {m.name: m for m in all_methods()}
        # one control per distinct parameter name (α/β have their own sliders)
        self.param_specs: dict[str, Any] = {}
        for m in self.methods.values():
            for p in m.params:
                if p.name not in ("alpha", "beta") and p.name not in self.param_specs:
                    self.param_specs[p.name] = p
        self.param_names = list(self.param_specs)
        self._cancel = threading.Event()
        # live renders (ActionHandlers.on_live_image): a turn counter, and one render at a time
        self._render_turn, self._render_turn_lock, self._render_lock = 0, threading.Lock(), threading.Lock()
        self._checkpoints: list[Checkpoint] = []

    def log(self, message: str) -> None:
        """One console line (the session's logger: the hosts print with a flush)."""
        self.session.log(message)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self, refresh: bool = False) -> list[Checkpoint]:
        if refresh or not self._checkpoints:
            self._checkpoints = list(self.host.checkpoints(refresh=refresh))
        return self._checkpoints

    def path_of(self, title: Optional[str]) -> Optional[Path]:
        """The file of a picker value. Hosts append "[shorthash]" to a title once the hash is
        known, so a value picked before that still resolves by its name."""
        if not title:
            return None
        for refresh in (False, True):
            items = self.checkpoints(refresh=refresh)
            for c in items:
                if c.title == title:
                    return c.path
            bare = _strip_hash(title)
            for c in items:
                if _strip_hash(c.title) == bare:
                    return c.path
        from ...inputs import VirtualInput, parse_model_ref

        if isinstance(parse_model_ref(title), VirtualInput):
            return None
        raise MergeError(f"model {title!r} is not in the checkpoint list any more; press Refresh to refresh")

    def title_of(self, path: Optional[Path]) -> Optional[str]:
        if path is None:
            return None
        for c in self.checkpoints():
            try:
                if Path(c.path).resolve() == Path(path).resolve():
                    return c.title
            except OSError:
                continue
        return None

    def arch_name(self, title: Optional[str]) -> str:
        try:
            path = self.path_of(title)
        except MergeError:
            path = None
        return (arch_cache().arch(path) if path else None) or "sd1"

    def default_a(self) -> Optional[str]:
        loaded = self.title_of(self.host.loaded_checkpoint())
        if loaded:
            return loaded
        selected = getattr(self.host, "selected_checkpoint", None)  # Forge: not loaded before the first generation
        chosen = self.title_of(selected()) if callable(selected) else None
        if chosen:
            return chosen
        items = self.checkpoints()
        return items[0].title if items else None

    def choices_for(self, a_title: Optional[str]) -> tuple[list[str], list[str]]:
        """(choices for A, choices for B… filtered to A's architecture)."""
        items = self.checkpoints()
        all_titles = [c.title for c in items]
        if not a_title:
            return all_titles, all_titles
        arch = self.arch_name(a_title)
        return all_titles, [c.title for c in filter_by_arch(items, arch)]

    # -- values ------------------------------------------------------------------------------------
    def parse_ui(self, values: Sequence[Any]) -> UiValues:
        n = len(LETTERS)
        models = [v or None for v in values[:n]]
        method, alpha, beta, weights, seed = values[n:n + 5]
        params = dict(zip(self.param_names, values[n + 5:]))
        extra = values[n + 5 + len(self.param_names):]
        loras = extra[0] if extra and isinstance(extra[0], str) else ""
        return UiValues(models, method or "weighted_sum", _num(alpha, 0.5), _num(beta, 0.5), weights or "", int(_num(seed, 0)),
                        params, loras)

    def recipe(self, ui: UiValues, *, dtype: str = "fp16", vae: Optional[str] = None) -> Recipe:
        """The recipe the board shows (raises MergeError with a clear sentence)."""
        method = get_method(ui.method)
        if not ui.models[0]:
            raise MergeError("pick model A")
        needed = method.min_models
        chosen = [m for m in ui.models if m]
        if len(chosen) < needed or any(not m for m in ui.models[:needed]):
            raise MergeError(
                f"method {method.name} needs models {', '.join(method.inputs)}; pick model {LETTERS[len([m for m in ui.models[:needed] if m])]}"
            )
        limit = method.max_models or len(LETTERS)
        refs: list[str] = []
        for title in ui.models[:limit] if method.variadic else ui.models[:needed]:
            if not title:
                continue
            path = self.path_of(title)
            refs.append(str(path) if path is not None else title)
        if not refs or not Path(refs[0]).is_file():
            raise MergeError(f"model A ({ui.models[0]}) is missing on disk; press Refresh to refresh the list")
        missing = [r for r in refs if not Path(r).is_file() and ("(" not in r and r != "zero")]
        if missing:
            raise MergeError(f"{Path(missing[0]).name} is missing on disk; press Refresh to refresh the list")
        arch = self.arch_name(ui.models[0])
        for letter, ref in zip(LETTERS[1:], refs[1:]):
            other = arch_cache().arch(Path(ref)) if Path(ref).is_file() else None
            if other is not None and other != arch:
                raise MergeError(
                    f"model {letter} ({Path(ref).name}) is {get_arch(other).label} but model A is "
                    f"{get_arch(arch).label}; pick models of one architecture"
                )
        kwargs: dict[str, Any] = {}
        params = {}
        for p in method.params:
            if p.name == "alpha":
                kwargs["alpha"] = float(ui.alpha)
            elif p.name == "beta":
                kwargs["beta"] = float(ui.beta)
            elif p.name in ui.params and ui.params[p.name] is not None and ui.params[p.name] != "":
                value = p.coerce(ui.params[p.name], method.name)
                if value != p.default:
                    params[p.name] = value
        if "alpha" in method.block_params and ui.weights.strip():
            weights = parse_block_weights(ui.weights, arch, base=float(ui.alpha))
            if any(v != float(ui.alpha) for v in weights.values()):
                kwargs["weights"] = format_block_weights(weights, arch)
        return Recipe(method.name, tuple(refs), params=params, seed=ui.seed, dtype=dtype, vae=vae, **kwargs)


def _match(value: Optional[str], choices: Sequence[str]) -> Optional[str]:
    """``value`` if it is a choice, else the choice naming the same file (hash added or dropped)."""
    if not value or value in choices:
        return value or None
    bare = _strip_hash(value)
    return next((c for c in choices if _strip_hash(c) == bare), None)


def _strip_hash(title: str) -> str:
    return re.sub(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$", "", title)


def _num(value: Any, default: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default
