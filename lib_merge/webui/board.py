"""The Merge Board: a gradio tab built against the ``Host`` protocol (works on gradio 3.41 and 4.x).

Model pickers A–F (B… filtered to A's architecture), method with parameter controls generated from
the method registry, 26 (SD1/SD2) or 20 (SDXL) block sliders, presets, a weight string kept in
sync with the sliders (instantly in ``javascript/merge_board.js``, and server-side on slider
release / string submit so it works without JS), a block-weight curve, an A-vs-B difference
heatmap, the live-preview switch and a Preview button (hosts with a sampler), Save with progress
and cancel, and "load recipe" from any merged file.

The handlers are plain methods of ``Board`` (testable without a browser); ``build()`` only lays
out components and wires events. Only ``gr.update`` is used, ``_js``/``js`` are chosen by the
gradio major version, no ``.style()``.
"""
from __future__ import annotations

import math
import re
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..arch.spec import SD1, get_arch
from ..blocks import format_block_weights, parse_block_weights, preset_names, preset_values
from ..errors import MergeCancelled, MergeError, OutputPathError
from ..methods import all_methods, get_method
from ..recipe import Recipe
from .host import (
    Checkpoint,
    Host,
    LiveSession,
    PreviewRequest,
    arch_cache,
    filter_by_arch,
    output_path,
)

ELEM = "mergeboard"
LETTERS = "ABCDEF"
ALL_BLOCKS = SD1.blocks  # 26 names; SDXL's 20 are a subset
DTYPES = ("fp16", "bf16", "fp32")
NO_VAE = "None (keep A's VAE)"
ALPHA_NOTE = (
    "**α is B's share**: 0 keeps model A, 1 gives model B (per block with the sliders). "
    "Block weights follow the supermerger layout: BASE = text encoders and VAE, IN/M/OUT = U-Net blocks."
)


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


class Board:
    """State-free handlers of the board (the live state is the ``LiveSession``)."""

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
        self._checkpoints: list[Checkpoint] = []

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
        from ..inputs import VirtualInput, parse_model_ref

        if isinstance(parse_model_ref(title), VirtualInput):
            return None
        raise MergeError(f"model {title!r} is not in the checkpoint list any more; press 🔄 to refresh")

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
        return UiValues(models, method or "weighted_sum", _num(alpha, 0.5), _num(beta, 0.5), weights or "", int(_num(seed, 0)), params)

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
            raise MergeError(f"model A ({ui.models[0]}) is missing on disk; press 🔄 to refresh the list")
        missing = [r for r in refs if not Path(r).is_file() and ("(" not in r and r != "zero")]
        if missing:
            raise MergeError(f"{Path(missing[0]).name} is missing on disk; press 🔄 to refresh the list")
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

    # -- handlers ----------------------------------------------------------------------------------
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
            try:
                with self.host.mutation_lock():
                    report = self.session.restore()
            except Exception as exc:
                return _html_message(f"could not restore model A: {exc}", "error")
            text = "Live preview off." + (f" Restored model A ({report.keys} tensors)." if report and report.keys else "")
            return _html_message(text)
        try:
            recipe = self.recipe(self.parse_ui(values))
        except MergeError as exc:
            return _html_message(f"Live preview on, but the board is not ready: {exc}", "warn")
        self.session.set_board(recipe)
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

    def on_preview(self, prompt, negative, seed, steps, width, height, cfg, *values):
        if not self.host.has_sampler:
            return None, "", _html_message("this host has no sampler: preview is unavailable", "warn")
        try:
            recipe = self.recipe(self.parse_ui(values))
            self.session.set_board(recipe)
            request = PreviewRequest(prompt or "", negative or "", int(_num(seed, -1)), int(_num(steps, 20)),
                                     int(_num(width, 512)), int(_num(height, 512)), float(_num(cfg, 7.0)))
            result = self.host.run_preview(request, self.session)
        except MergeError as exc:
            return None, "", _html_message(str(exc), "error")
        except Exception as exc:
            traceback.print_exc()
            return None, "", _html_message(f"preview failed: {type(exc).__name__}: {exc}", "error")
        return result.image, result.infotext, _html_message(self.session.status_line())

    def on_compare(self, a_title, b_title, progress=None):
        """Per-block relative difference and cosine of A vs B (the inspector), as a heatmap."""
        from ..inspect import inspect_models

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

    def on_save(self, name, dtype, vae_title, overwrite, *values, progress=None):
        """Write the board's recipe with the streaming engine into the checkpoint folder."""
        from ..engine import merge

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
                    raise MergeError(f"VAE {vae_title!r} is not in the list any more; press 🔄")
            recipe = self.recipe(self.parse_ui(values), dtype=dtype or settings.dtype, vae=vae)
            if path.exists() and not overwrite:
                raise OutputPathError(f"{path.name} already exists in {folder}; tick 'Overwrite' or choose another name")
            if any(_same_file(path, m) for m in recipe.models):
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
            if recipe.vae:
                result = save_with_vae(recipe, path, threads=settings.threads or None, overwrite=bool(overwrite),
                                       progress=report, cancel=self._cancel)
            else:
                result = merge(recipe, path, threads=settings.threads or None, overwrite=bool(overwrite),
                               progress=report, cancel=self._cancel)
        except MergeCancelled:
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
        return _html_message(f"saved {result.path.name}{short} in {result.seconds:.1f} s to {result.path.parent}; it is in the checkpoint list now")

    def on_cancel(self):
        self._cancel.set()
        return _html_message("cancelling the save…", "warn")

    def on_load_recipe(self, title: Optional[str]):
        """Fill the board from the recipe embedded in a merged file."""
        from ..recipe import load_recipe

        n_out = len(LETTERS) + 6 + len(self.param_names)
        try:
            path = self.path_of(title)
            if path is None:
                raise MergeError("pick a merged model to load its recipe from")
            recipe = load_recipe(path)
            method = get_method(recipe.method)
        except MergeError as exc:
            return [_update() for _ in range(n_out)] + [_html_message(str(exc), "error")]
        titles = []
        for ref in recipe.models:
            t = self.title_of(Path(ref)) if Path(ref).exists() else None
            titles.append(t or ref)
        titles += [None] * (len(LETTERS) - len(titles))
        missing = [Path(r).name for r, t in zip(recipe.models, titles) if t == r and Path(r).suffix]
        a_arch = self.arch_name(titles[0]) if titles[0] else "sd1"
        alpha = recipe.alpha if recipe.alpha is not None else 0.5
        weights = parse_block_weights(recipe.weights, a_arch, base=alpha) if "alpha" in method.block_params else {}
        out = [_update(value=t) for t in titles[: len(LETTERS)]]
        out += [_update(value=method.name), _update(value=alpha), _update(value=recipe.beta if recipe.beta is not None else 0.5),
                _update(value=format_block_weights(weights, a_arch) if weights else ""), _update(value=recipe.seed),
                _update(value=recipe.dtype)]
        for name in self.param_names:
            out.append(_update(value=recipe.params[name]) if name in recipe.params else _update())
        note = f"loaded the recipe of {Path(path).name}"
        if missing:
            note += f"; missing models: {', '.join(missing)}"
        return out + [_html_message(note, "warn" if missing else "info")]

    def on_status(self):
        return _html_message(self.session.status_line())

    # -- plots -----------------------------------------------------------------------------------
    def curve(self, arch: str, values: dict[str, float]):
        return block_curve(get_arch(arch).blocks, [values[b] for b in get_arch(arch).blocks])


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


def _clamp(v: float) -> float:
    return min(1.0, max(0.0, float(v)))


def _same_file(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def block_curve(blocks: Sequence[str], values: Sequence[float]):
    """Block-weight curve (matplotlib Figure; no pyplot, so it is thread-safe)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.4), dpi=90)
    ax = fig.add_subplot(111)
    xs = list(range(len(blocks)))
    ax.plot(xs, values, marker="o", color="#e07b39")
    ax.axhline(0, color="#888", linewidth=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels(blocks, rotation=90, fontsize=7)
    ax.set_ylabel("α (B's share)")
    low, high = min(0.0, min(values)), max(1.0, max(values))
    ax.set_ylim(low - 0.05, high + 0.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap(result) -> Any:
    """Per-block ‖B−A‖/‖A‖ and 1−cos as a two-row heatmap with the values written in."""
    import numpy as np
    from matplotlib.figure import Figure

    names = list(result.blocks)
    rel = [result.blocks[n].relative_difference for n in names]
    cos = [1 - result.blocks[n].cosine for n in names]
    data = np.array([rel, cos], dtype=float)
    fig = Figure(figsize=(9, 2.2), dpi=90)
    ax = fig.add_subplot(111)
    shown = np.nan_to_num(data / np.nanmax(data, axis=1, keepdims=True).clip(min=1e-12), nan=0.0)
    ax.imshow(shown, aspect="auto", cmap="magma")
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["‖B−A‖/‖A‖", "1 − cos"], fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    for row in range(2):
        for col in range(len(names)):
            v = data[row, col]
            if math.isfinite(v):
                ax.text(col, row, f"{v:.2g}", ha="center", va="center", fontsize=5.5,
                        color="white" if shown[row, col] < 0.6 else "black")
    ax.set_title("A vs B per block (brighter = more different)", fontsize=9)
    fig.tight_layout()
    return fig


# -- VAE bake --------------------------------------------------------------------------------------
VAE_PREFIX = "first_stage_model."


def save_with_vae(recipe: Recipe, path: Path, **kwargs):
    """The engine's merge with the VAE keys taken from ``recipe.vae`` (a standalone VAE file or a
    checkpoint), cast to the output dtype. The recipe records the VAE, so the file says what it
    holds. (Belongs in the planner so ``merge --recipe`` reproduces it; see docs/board.md.)"""
    from ..engine import MergeResult, execute
    from ..io.reader import CheckpointReader, TensorInfo, open_checkpoint
    from ..io.dtypes import TORCH_TO_CODE
    from ..plan import open_inputs, plan_merge

    inputs = open_inputs(recipe.models)
    vae = open_checkpoint(recipe.vae)
    try:
        plan = plan_merge(recipe, inputs)

        class _VaeReader(CheckpointReader):
            def __init__(self) -> None:
                self.path = vae.path
                self.metadata = vae.metadata
                self.infos = {}
                self._map = {}

            def add(self, key: str, source_key: str, dtype) -> None:
                src = vae.infos[source_key]
                size = src.numel * __import__("torch").empty((), dtype=dtype).element_size()
                self.infos[key] = TensorInfo(key, src.shape, TORCH_TO_CODE[dtype], -1, size)
                self._map[key] = (source_key, dtype)

            def get(self, key: str):
                source_key, dtype = self._map[key]
                return vae.get(source_key).to(dtype)

        reader = _VaeReader()
        index = len(plan.inputs)
        baked = 0
        for i, job in enumerate(plan.jobs):
            if not job.key.startswith(VAE_PREFIX):
                continue
            short = job.key[len(VAE_PREFIX):]
            source_key = job.key if job.key in vae.infos else short if short in vae.infos else None
            if source_key is None or tuple(vae.infos[source_key].shape) != tuple(job.shape):
                continue
            reader.add(job.key, source_key, job.out_dtype)
            plan.jobs[i] = type(job)(job.key, "copy", job.block, job.shape, job.out_dtype, {}, (index,))
            baked += 1
        if not baked:
            raise MergeError(f"{Path(recipe.vae).name} has no VAE keys matching this model; pick a VAE for {plan.info.arch.label}")
        plan.inputs.append(reader)
        result: MergeResult = execute(plan, path, **kwargs)
        return result
    finally:
        for r in inputs:
            if isinstance(r, CheckpointReader):
                r.close()
        vae.close()


# -- layout and wiring -------------------------------------------------------------------------------
def build(host: Host, session: Optional[LiveSession] = None, *, standalone: bool = False):
    """Create the board's components inside the current gradio context (or a new ``gr.Blocks``)
    and wire every event. Returns the Blocks and the ``Board`` (for hooks and tests)."""
    gr = _gr()
    board = Board(host, session)
    method = board.methods.get("weighted_sum") or next(iter(board.methods.values()))
    a_title = board.default_a()
    arch = board.arch_name(a_title)
    a_choices, b_choices = board.choices_for(a_title)
    settings = host.settings()
    values = parse_block_weights(None, arch, base=0.5)

    blocks_ctx = gr.Blocks(analytics_enabled=False, title="Merge Board") if standalone else gr.Blocks(analytics_enabled=False)
    with blocks_ctx as ui:
        with gr.Column(elem_id=f"{ELEM}_root"):
            notes = [ALPHA_NOTE] + [f"*{n}*" for n in host.notes()]
            gr.Markdown("\n\n".join(notes), elem_id=f"{ELEM}_notes")
            with gr.Row():
                pickers = []
                for i, letter in enumerate(LETTERS):
                    pickers.append(gr.Dropdown(
                        choices=a_choices if i == 0 else b_choices, value=a_title if i == 0 else None,
                        label=f"Model {letter}" + (" (loaded model for live preview)" if i == 0 and host.has_sampler else ""),
                        elem_id=f"{ELEM}_model_{letter}", visible=i < 2, interactive=True, allow_custom_value=i > 0,
                    ))
                refresh = gr.Button("🔄", elem_id=f"{ELEM}_refresh", scale=0, min_width=40)
            with gr.Row():
                method_dd = gr.Dropdown(choices=list(board.methods), value=method.name, label="Method", elem_id=f"{ELEM}_method")
                seed = gr.Number(value=0, precision=0, label="Seed (random methods, noise inputs)", elem_id=f"{ELEM}_seed")
                arch_html = gr.HTML(board._arch_html(arch, a_title)["value"], elem_id=f"{ELEM}_arch")
            method_help = gr.Markdown(f"**{method.name}** — {method.help.splitlines()[0]}", elem_id=f"{ELEM}_method_help")
            with gr.Row():
                alpha = gr.Slider(minimum=-1.0, maximum=2.0, step=0.01, value=0.5, label=Board._alpha_label(method), elem_id=f"{ELEM}_alpha")
                beta = gr.Slider(minimum=-1.0, maximum=2.0, step=0.01, value=0.5, label="β", elem_id=f"{ELEM}_beta", visible=False)
            param_controls = []
            with gr.Row():
                for name, spec in board.param_specs.items():
                    kw = dict(label=name, elem_id=f"{ELEM}_param_{name}", visible=False,
                              info=f"{spec.help} ({spec.describe_range()})")
                    if spec.kind is bool:
                        control = gr.Checkbox(value=bool(spec.default), **kw)
                    elif spec.choices is not None:
                        control = gr.Dropdown(choices=list(spec.choices), value=spec.default, **kw)
                    elif spec.kind in (int, float):
                        control = gr.Number(value=spec.default, precision=0 if spec.kind is int else None, **kw)
                    else:
                        control = gr.Textbox(value=str(spec.default), lines=1, **kw)
                    param_controls.append(control)
            with gr.Column(elem_id=f"{ELEM}_blocks") as block_area:
                with gr.Row():
                    preset = gr.Dropdown(choices=preset_names(arch), value=None, label="Preset", elem_id=f"{ELEM}_preset")
                    weights = gr.Textbox(value=format_block_weights(values, arch), lines=1, max_lines=2,
                                         label="Block weights (α per block; presets and IN04=0.3 overrides work; Enter applies)",
                                         elem_id=f"{ELEM}_weights")
                sliders: dict[str, Any] = {}
                visible_blocks = get_arch(arch).blocks
                with gr.Row():
                    sliders["BASE"] = gr.Slider(0.0, 1.0, step=0.01, value=0.5, label="BASE", elem_id=f"{ELEM}_w_BASE")
                    sliders["M00"] = gr.Slider(0.0, 1.0, step=0.01, value=0.5, label="M00", elem_id=f"{ELEM}_w_M00")
                with gr.Row():
                    with gr.Column():
                        for i in range(12):
                            name = f"IN{i:02d}"
                            sliders[name] = gr.Slider(0.0, 1.0, step=0.01, value=0.5, label=name,
                                                      elem_id=f"{ELEM}_w_{name}", visible=name in visible_blocks)
                    with gr.Column():
                        for i in range(11, -1, -1):
                            name = f"OUT{i:02d}"
                            sliders[name] = gr.Slider(0.0, 1.0, step=0.01, value=0.5, label=name,
                                                      elem_id=f"{ELEM}_w_{name}", visible=name in visible_blocks)
                ordered_sliders = [sliders[n] for n in ALL_BLOCKS]
                curve = gr.Plot(value=board.curve(arch, values), label="Block-weight curve", elem_id=f"{ELEM}_curve")
            with gr.Row():
                compare = gr.Button("Compare A and B (per-block difference)", elem_id=f"{ELEM}_compare")
            diff_plot = gr.Plot(label="A vs B per block", elem_id=f"{ELEM}_heatmap")
            with gr.Group(visible=host.has_sampler, elem_id=f"{ELEM}_preview_group"):
                live = gr.Checkbox(value=False, label="Live preview: txt2img generations use this merge (restored when off)",
                                   elem_id=f"{ELEM}_live")
                with gr.Row():
                    with gr.Column():
                        p_prompt = gr.Textbox(label="Prompt (empty = untitled)", lines=2, elem_id=f"{ELEM}_prompt")
                        p_negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{ELEM}_negative")
                        with gr.Row():
                            p_seed = gr.Number(value=-1, precision=0, label="Seed", elem_id=f"{ELEM}_pseed")
                            p_steps = gr.Number(value=20, precision=0, label="Steps", elem_id=f"{ELEM}_steps")
                            p_cfg = gr.Number(value=7.0, label="CFG", elem_id=f"{ELEM}_cfg")
                        with gr.Row():
                            p_width = gr.Number(value=512 if arch != "sdxl" else 1024, precision=0, label="Width", elem_id=f"{ELEM}_width")
                            p_height = gr.Number(value=512 if arch != "sdxl" else 1024, precision=0, label="Height", elem_id=f"{ELEM}_height")
                        preview_btn = gr.Button("Preview", variant="primary", elem_id=f"{ELEM}_preview")
                    with gr.Column():
                        p_image = gr.Image(type="pil", interactive=False, label="Preview", elem_id=f"{ELEM}_image", height=384)
                        p_info = gr.Textbox(label="Infotext", lines=3, interactive=False, elem_id=f"{ELEM}_infotext")
            with gr.Accordion("Save", open=True, elem_id=f"{ELEM}_save_box"):
                with gr.Row():
                    save_name = gr.Textbox(label=f"File name (saved in {settings.output_dir})", lines=1, elem_id=f"{ELEM}_save_name")
                    save_dtype = gr.Dropdown(choices=list(DTYPES), value=settings.dtype, label="dtype", elem_id=f"{ELEM}_dtype")
                    save_vae = gr.Dropdown(choices=[NO_VAE] + [v.title for v in host.vaes()], value=NO_VAE, label="Bake VAE",
                                           elem_id=f"{ELEM}_vae")
                    overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id=f"{ELEM}_overwrite")
                with gr.Row():
                    save_btn = gr.Button("Save", variant="primary", elem_id=f"{ELEM}_save")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id=f"{ELEM}_cancel")
                save_result = gr.HTML(elem_id=f"{ELEM}_save_result")
            with gr.Accordion("Load a recipe from a merged file", open=False, elem_id=f"{ELEM}_recipe_box"):
                with gr.Row():
                    recipe_src = gr.Dropdown(choices=a_choices, value=None, label="Merged model", elem_id=f"{ELEM}_recipe_src")
                    load_btn = gr.Button("Load recipe", elem_id=f"{ELEM}_load_recipe")
            status = gr.HTML(_html_message(board.session.status_line()), elem_id=f"{ELEM}_status")

        recipe_inputs = pickers + [method_dd, alpha, beta, weights, seed] + param_controls
        others = pickers[1:]

        refresh.click(board.on_refresh, [pickers[0]] + others, pickers + [recipe_src, save_vae], show_progress="hidden")
        pickers[0].change(board.on_model_a, [pickers[0], weights, alpha] + others,
                          others + ordered_sliders + [weights, preset, arch_html, curve], show_progress="hidden")
        method_dd.change(board.on_method, [method_dd], others + [alpha, beta, block_area] + param_controls + [method_help],
                         show_progress="hidden")
        preset.change(board.on_preset, [preset, pickers[0]], ordered_sliders + [weights, curve], show_progress="hidden")
        alpha.release(board.on_alpha, [alpha, pickers[0]], ordered_sliders + [weights, curve], show_progress="hidden")
        for name, slider in sliders.items():
            slider.release(_bind(board.on_slider, name), [slider, weights, pickers[0], alpha], [weights, curve],
                           show_progress="hidden")
        for event in (weights.submit, weights.blur):
            event(board.on_weights_text, [weights, pickers[0], alpha], ordered_sliders + [weights, curve, status],
                  show_progress="hidden")
        for control in recipe_inputs:
            control.change(board.on_change, recipe_inputs, [status], show_progress="hidden")
        live.change(board.on_live, [live] + recipe_inputs, [status], show_progress="hidden")
        preview_btn.click(board.on_preview, [p_prompt, p_negative, p_seed, p_steps, p_width, p_height, p_cfg] + recipe_inputs,
                          [p_image, p_info, status])

        def compare_fn(a, b, progress=gr.Progress()):
            return board.on_compare(a, b, progress)

        compare.click(compare_fn, [pickers[0], pickers[1]], [diff_plot, status])

        def save_fn(name, dtype, vae, over, *vals, progress=gr.Progress()):
            return board.on_save(name, dtype, vae, over, *vals, progress=progress)

        save_event = save_btn.click(save_fn, [save_name, save_dtype, save_vae, overwrite] + recipe_inputs, [save_result])
        save_event.then(board.on_refresh, [pickers[0]] + others, pickers + [recipe_src, save_vae], show_progress="hidden")
        save_event.then(None, None, None, **_js_kwargs("() => { if (window.mergeboardAfterSave) mergeboardAfterSave(); }"))
        cancel_btn.click(board.on_cancel, None, [save_result], queue=False)
        load_btn.click(board.on_load_recipe, [recipe_src], pickers + [method_dd, alpha, beta, weights, seed, save_dtype]
                       + param_controls + [status])
    board.components = dict(
        pickers=pickers, method=method_dd, alpha=alpha, beta=beta, weights=weights, seed=seed, params=param_controls,
        sliders=sliders, preset=preset, curve=curve, diff_plot=diff_plot, live=live, preview=preview_btn,
        image=p_image, infotext=p_info, save_name=save_name, save_dtype=save_dtype, save_vae=save_vae,
        overwrite=overwrite, save=save_btn, cancel=cancel_btn, save_result=save_result, recipe_src=recipe_src,
        load=load_btn, status=status, refresh=refresh, compare=compare, arch=arch_html,
    )
    return ui, board


def _bind(fn: Callable, first: Any) -> Callable:
    def bound(*args):
        return fn(first, *args)

    bound.__name__ = f"{getattr(fn, '__name__', 'handler')}_{first}"
    return bound
