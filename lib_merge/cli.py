"""Command line: ``python -m lib_merge merge | inspect | methods | demo | bench``.

Every failure the user can fix prints one line ``error: …`` naming the file/key and the fix, and
exits with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from .errors import MergeError

ALPHA_NOTE = "alpha is B's share: 0 gives A, 1 gives B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_merge",
        description="Stream-merge Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL) block by block.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge checkpoints into a new .safetensors",
        description=f"Merge models A B [C D …] (in that order) into OUT. {ALPHA_NOTE}. Models may also be "
        "the virtual inputs 'zero' or 'noise(seed=N,scale=S)'.",
    )
    m.add_argument("models", nargs="*", help="model paths: A B [C D …]")
    m.add_argument("-o", "--output", required=True, help="output .safetensors path")
    m.add_argument("--method", help="merge method (see `methods`); default weighted_sum")
    m.add_argument("--alpha", type=float, help=f"global ratio; {ALPHA_NOTE}")
    m.add_argument("--beta", type=float, help="second ratio for methods that take one")
    m.add_argument(
        "--weights",
        help="per-block alpha: one number, 26/25 (SD1/SD2) or 20/19 (SDXL) comma-separated values, a preset "
        "name, or overrides like 'IN04=0.3,OUT02=1' on top of --alpha; overrides --alpha where given",
    )
    m.add_argument("--beta-weights", help="per-block beta, same syntax as --weights")
    m.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter (repeatable)")
    m.add_argument("--seed", type=int, help="seed for random methods and noise inputs (default 0)")
    m.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output dtype (default fp16)")
    m.add_argument("--blocks", help="key→block policy: supermerger (default) or sd-mecha")
    m.add_argument("--threads", type=int, help="worker threads (default: cores + 1, 2..4)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (inputs are never overwritten)")
    m.add_argument("--recipe", help="re-run a recipe: a recipe JSON or a checkpoint merged by this tool")
    m.add_argument("--no-hash", action="store_true", help="skip sha256 of inputs and output (faster, less metadata)")

    i = sub.add_parser("inspect", help="architecture and per-block statistics; with B, per-block difference")
    i.add_argument("a")
    i.add_argument("b", nargs="?")
    i.add_argument("--blocks", default="supermerger", help="key→block policy")

    sub.add_parser("methods", help="list merge methods with their parameters")

    d = sub.add_parser("demo", help="build small synthetic checkpoints and run example merges (no download)")
    d.add_argument("--dir", default="demo_models", help="folder for the demo models and outputs")

    b = sub.add_parser("bench", help="benchmark merge speed and memory against the I/O floor")
    b.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    b.add_argument("--dir", default="bench_tmp", help="scratch folder (needs ~3× a checkpoint of free space)")
    b.add_argument("--threads", type=int)
    b.add_argument("--skip-baseline", action="store_true", help="skip the whole-model load_file baseline")
    b.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            return _merge(args)
        if args.command == "inspect":
            from .inspect import format_inspection, inspect_models

            print(format_inspection(inspect_models(args.a, args.b, policy=args.blocks)))
            return 0
        if args.command == "methods":
            print(describe_methods())
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.dir))
        if args.command == "bench":
            from .bench import run_bench

            return run_bench(args)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


def recipe_from_args(args: argparse.Namespace):
    from .recipe import Recipe, load_recipe

    overrides = {
        "method": args.method,
        "alpha": args.alpha,
        "beta": args.beta,
        "weights": args.weights,
        "beta_weights": args.beta_weights,
        "seed": args.seed,
        "dtype": args.dtype,
        "blocks": args.blocks,
    }
    params = parse_params(args.param)
    if args.recipe:
        recipe = load_recipe(args.recipe)
        if args.models:
            recipe = recipe.replace(models=tuple(args.models))
        changes = {k: v for k, v in overrides.items() if v is not None}
        if params:
            changes["params"] = {**recipe.params, **params}
        return recipe.replace(**changes)
    if len(args.models) < 1:
        raise MergeError("merge needs models A B [C …] or --recipe FILE")
    return Recipe(
        method=args.method or "weighted_sum",
        models=tuple(args.models),
        alpha=args.alpha,
        beta=args.beta,
        weights=args.weights,
        beta_weights=args.beta_weights,
        params=params,
        seed=args.seed or 0,
        dtype=args.dtype or "fp16",
        blocks=args.blocks or "supermerger",
    )


def parse_params(items: Sequence[str]) -> dict[str, str]:
    from .errors import BadParameterError

    params: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise BadParameterError(f"--param {item!r}: write NAME=VALUE")
        name, value = item.split("=", 1)
        params[name.strip()] = value.strip()
    return params


def _merge(args: argparse.Namespace) -> int:
    from .engine import merge

    recipe = recipe_from_args(args)
    cancel = threading.Event()
    bar = _progress_bar()

    def on_sigint(signum, frame):  # first Ctrl-C: stop cleanly; the writer removes its temp file
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = merge(
            recipe,
            args.output,
            threads=args.threads,
            overwrite=args.overwrite,
            progress=bar.update if bar else None,
            cancel=cancel,
            hash_inputs=not args.no_hash,
            hash_output=not args.no_hash,
            warn=lambda msg: print(f"warning: {msg}", file=sys.stderr),
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar:
            bar.close()
    size = result.bytes_written / 2**30
    print(f"wrote {result.path} ({size:.2f} GiB) in {result.seconds:.1f} s")
    if result.sha256:
        print(f"sha256 {result.sha256}")
        print(f"short hash [{result.short_hash}]")
    return 0


class _TqdmBar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", file=sys.stderr)

    def update(self, done: int, total: int, key: str) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _progress_bar() -> _TqdmBar | None:
    if not sys.stderr.isatty():
        return None
    try:
        return _TqdmBar()
    except ImportError:
        return None


def describe_methods() -> str:
    from .methods import all_methods

    lines = [f"Merge methods ({ALPHA_NOTE}; per-block parameters follow --weights / --beta-weights):", ""]
    for spec in all_methods():
        models = ", ".join(spec.inputs) + (", …" if spec.variadic else "")
        lines.append(f"{spec.name}  (models: {models})")
        for doc_line in spec.help.splitlines():
            lines.append(f"    {doc_line.strip()}")
        for p in spec.params:
            block = " per block" if p.per_block else ""
            lines.append(f"    --param {p.name}={p.default!r}  {p.describe_range()}{block}: {p.help}")
        lines.append("")
    lines.append("Virtual models usable anywhere a model path is: zero, noise(seed=N,scale=S)")
    from .presets import PRESETS

    lines.append("Block-weight presets: " + ", ".join(PRESETS))
    return "\n".join(lines)
