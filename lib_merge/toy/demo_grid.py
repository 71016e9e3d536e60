"""The demo's picture: two toy models, their merges and untitled samples in one PNG grid.

Every merge goes through the real engine (``engine.merge``) into a file and is loaded back, so
the grid shows what a user's merged checkpoint draws, not an in-memory shortcut. All rows share
the prompts and seeds, so a column compares the same request across models.

Sampling runs on one torch thread: these 16×16 models are far too small for intra-op threads
to pay off, and on a busy 2-core machine a forward with two threads took 2-10 s against 0.1 s
with one (each op waits for whichever thread is descheduled).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED = ("toy-round.safetensors", "toy-square.safetensors")  # model A, model B

# Both shards' shapes (round: circle, ring; square: square, diamond) in a plain setting, so a
# column shows which model knows which shape.
PROMPTS = (
    "large red circle, centre, plain background, vivid borderless flat",
    "large blue ring, centre, plain background, vivid borderless flat",
    "large green circle, centre, striped background, pastel outlined flat",
    "large yellow square, centre, plain background, vivid borderless flat",
    "large magenta diamond, centre, plain background, vivid borderless flat",
    "large cyan square, centre, dotted background, deep outlined shaded",
)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PRESETS = ("GRAD_V", "SMOOTHSTEP")
SEED = 0
STEPS = 20
CFG = 5.0
# The untitled stack of the issue: CFG 1 with CFG++ λ 0.6, PAG 3 and SEG 3 (σ = ∞, the default)
STACK = dict(cfgpp=0.6, pag_scale=3.0, seg_scale=3.0)
STACK_CFG = 1.0


@dataclass
class DemoGrid:
    path: Path
    legend: str  # one line: what each row is, top to bottom
    rows: list  # uint8 (N, 3, R, R) per row, for tests
    labels: list[str]
    seconds: float


def pretrained_models(folder: Optional[Path] = None) -> Optional[tuple[Path, Path]]:
    """The shipped toy checkpoints (A, B), or None when the package holds none."""
    folder = PRETRAINED_DIR if folder is None else Path(folder)
    paths = tuple(folder / name for name in PRETRAINED)
    return paths if all(p.is_file() for p in paths) else None  # type: ignore[return-value]


def copy_pretrained(folder: Path, source: Optional[Path] = None) -> list[Path]:
    """Copy the shipped toy checkpoints into ``folder`` where missing or different in size (atomic:
    a copy interrupted half way leaves no file under the final name); [] when none are shipped."""
    found = pretrained_models(source)
    if found is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in found:
        dst = folder / src.name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        out.append(dst)
    return out


def _merge_jobs(a: Path, b: Path) -> list[tuple[str, str, object]]:
    from ..recipe import Recipe

    jobs = [(f"α={alpha:g}", f"toy_alpha_{alpha:g}.safetensors",
             Recipe("weighted_sum", (str(a), str(b)), alpha=alpha, dtype="fp32")) for alpha in ALPHAS]
    jobs += [(preset, f"toy_{preset.lower()}.safetensors",
              Recipe("weighted_sum", (str(a), str(b)), alpha=0.5, weights=preset, dtype="fp32")) for preset in PRESETS]
    return jobs


def make_demo_grid(
    model_a: Path, model_b: Path, out_dir: Path, *, prompts: Sequence[str] = PROMPTS, seed: int = SEED,
    steps: int = STEPS, log: Callable[[str], None] = lambda m: None,
) -> DemoGrid:
    """Merge ``model_a`` and ``model_b`` (α sweep and presets, fp32), sample every model on
    ``prompts`` and the α = 0.5 merge untitled without and with CFG++ + PAG + SEG, and write
    ``out_dir/toy_grid.png``."""
    from ..torch_threads import on_one_torch_thread

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    return on_one_torch_thread(_make, Path(model_a), Path(model_b), Path(out_dir), list(prompts), seed, steps,
                               log, start)


def _make(a: Path, b: Path, out_dir: Path, prompts: list[str], seed: int, steps: int, log, start: float) -> DemoGrid:
    from ..engine import merge
    from .sampling import toy_guidance
    from .model import load_toy_checkpoint
    from .png import grid, write_png
    from .sampling import sample

    model_a = load_toy_checkpoint(a)
    resolution = model_a.config.resolution

    def load(path: Path):
        model = load_toy_checkpoint(path)
        # A merge's file holds the engine's metadata, not the toy config, so its resolution would
        # be the family default: sample it at A's.
        model.config = replace(model.config, resolution=resolution)
        return model

    def draw(model):
        return sample(model, prompts, seed=seed, steps=steps, cfg_scale=CFG)

    labels, rows = [f"A ({a.stem})", f"B ({b.stem})"], [draw(model_a), draw(load(b))]
    half = None
    for label, name, recipe in _merge_jobs(a, b):
        result = merge(recipe, out_dir / name, overwrite=True, warn=lambda m: log(f"  warning: {m}"))
        model = load(result.path)
        if label == "α=0.5":
            half = model
        labels.append(label)
        rows.append(draw(model))
        log(f"  {label}: {result.path.name} [{result.short_hash}]")
    n = len(prompts)
    labels.append("untitled α=0.5, CFG")
    rows.append(sample(half, [""] * n, seed=seed, steps=steps, cfg_scale=CFG, untitled="empty"))
    labels.append("untitled α=0.5, CFG++ λ0.6 + PAG 3 + SEG 3 at CFG 1")
    rows.append(sample(half, [""] * n, seed=seed, steps=steps, cfg_scale=STACK_CFG, untitled="empty",
                       settings=toy_guidance(**STACK)))
    path = write_png(out_dir / "toy_grid.png", grid(rows, scale=6))
    legend = "rows: " + " | ".join(labels) + f"; columns: {n} prompts, seed {seed}, {steps} Euler steps, CFG {CFG:g}"
    return DemoGrid(path, legend, rows, labels, time.perf_counter() - start)
