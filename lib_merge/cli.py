"""Command line: ``python -m lib_merge merge | soup | inspect | methods | demo | bench``.

Every failure the user can fix prints one line ``error: …`` naming the file/key and the fix, and
exits with status 2 (130 after Ctrl-C, the shell's convention for SIGINT); no traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from . import board_cli
from .bench.cli import bench_argv, bench_parsers, run_benchmark, run_pass_through
from .errors import MergeCancelled, MergeError
from .lora.cli import add_lora_parsers, run_extract, run_lora_merge
from .soup.cli import add_soup_parser, run_soup
from .toy.cli import add_toy_parser, run_toy

ALPHA_NOTE = "alpha is B's share: 0 gives A, 1 gives B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_merge",
        description="Stream-merge Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL) block by block.",
        fromfile_prefix_chars="@",  # `merge @models.txt …`: one argument per line, for 200-model merges
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge checkpoints into a new .safetensors",
        description=f"Merge models A B [C D …] (in that order) into OUT. {ALPHA_NOTE}. Models may also be "
        "the virtual inputs 'zero' or 'noise(seed=N,scale=S)'. Task-vector methods (ties, dare, della, tgmd, dgmla, "
        "…) take A as the base and B, C, … as its fine-tunes; @FILE reads arguments from FILE, one per line.",
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
    m.add_argument("--dtype", choices=("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"),
                   help="output dtype (default fp16); fp8 applies to the U-Net only (text encoders and VAE fp16) "
                   "unless --fp8-all; rounded to nearest even with saturation at ±max")
    m.add_argument("--fp8-all", action="store_true", help="with an fp8 --dtype: text encoders and VAE in fp8 too")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="bake this LoRA/LyCORIS into the result, after the method (repeatable; strength default 1)")
    m.add_argument("--lora-weights", action="append", default=[], metavar="WEIGHTS",
                   help="per-block strength factor of the matching --lora (one for all, or one per --lora): our "
                   "block-weight syntax, lbw:PRESET (LoRA Block Weight presets) or a 17/12-value LBW vector")
    m.add_argument("--allow-mixed-prediction", nargs="?", const="A", metavar="MODEL",
                   help="merge models of different prediction types (eps / v / ztsnr / EDM) anyway; the output keeps "
                   "the markers of MODEL (default A)")
    m.add_argument("--blocks", help="key→block policy: supermerger (default), supermerger-2023, bbc-mc or sd-mecha")
    m.add_argument("--vae", metavar="FILE", help="bake this VAE (a VAE file or a checkpoint) into the output")
    m.add_argument("--threads", type=int, help="worker threads (default: cores + 1, 2..4)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (inputs are never overwritten)")
    m.add_argument("--recipe", help="re-run a recipe: a recipe JSON or a checkpoint merged by this tool")
    m.add_argument(
        "--models-dir", metavar="DIR",
        help="with --recipe: look for the recorded models (and VAE) in DIR, by their recorded relative path or "
        "file name, before their recorded place (for a recipe moved away from its models)",
    )
    m.add_argument("--no-hash", action="store_true", help="skip sha256 of inputs and output (faster, less metadata)")
    m.add_argument(
        "--max-memory", metavar="SIZE",
        help="cap the working set (e.g. 24G): keys run side by side only while their estimates fit; the plan "
        "prints the bound before starting",
    )
    m.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted merge of OUT from OUT.tmp and OUT.resume (alone with -o, or with the same "
        "models/recipe); the result is bit for bit that of an uninterrupted run",
    )
    m.add_argument(
        "--resume-file", choices=("auto", "on", "off"), default="auto",
        help="write OUT.resume so a crash or Ctrl-C can be resumed (auto: when the merge reads ≥ 8 GiB)",
    )
    add_executor_options(m)

    i = sub.add_parser("inspect", help="architecture and per-block statistics; with B, per-block difference")
    i.add_argument("a")
    i.add_argument("b", nargs="?")
    i.add_argument("--blocks", default="supermerger", help="key→block policy")

    sub.add_parser("methods", help="list merge methods with their parameters")

    add_soup_parser(sub)
    add_lora_parsers(sub)
    add_toy_parser(sub)

    d = sub.add_parser("demo", help="build small synthetic checkpoints and run example merges (no download)")
    d.add_argument("--dir", default="demo_models", help="folder for the demo models and outputs")

    bench_parsers(sub)
    board_cli.add_parser(sub)
    return parser


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="where keys run: local threads (default) or Ray tasks, one per shard of keys; with ray, --threads "
        "and --max-memory apply to each worker, and inputs and output must be on storage every node sees "
        "(docs/distributed.md)",
    )
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="join this Ray cluster (what `ray start --head` printed); default: a local Ray instance")
    parser.add_argument("--shard-size", metavar="SIZE",
                        help="with --executor ray: input bytes one task reads (default 256M)")


def executor_from_args(args: argparse.Namespace):
    from .engine.executors import make_executor
    from .many import parse_size

    try:
        shard = parse_size(args.shard_size) if args.shard_size else None
    except MergeError as exc:
        raise type(exc)(str(exc).replace("--max-memory", "--shard-size", 1)) from None
    return make_executor(args.executor, address=args.ray_address, shard_bytes=shard)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ran = run_pass_through(argv)
    if ran is not None:
        return ran
    args = build_parser().parse_args(bench_argv(argv))
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
        if args.command == "soup":
            return run_soup(args)
        if args.command == "extract":
            return run_extract(args)
        if args.command == "lora-merge":
            return run_lora_merge(args)
        if args.command == "toy":
            return run_toy(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.dir))
        if args.command == "bench":
            return run_benchmark(args)
        if args.command == "board":
            return board_cli.run(args)
    except (MergeCancelled, KeyboardInterrupt) as exc:  # Ctrl-C: the shell's 128 + SIGINT
        print(f"error: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment refused something no check foresaw: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
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
        "vae": getattr(args, "vae", None),
        "loras": _loras_from_args(args) or None,
        "prediction": getattr(args, "allow_mixed_prediction", None),
        "fp8_all": True if getattr(args, "fp8_all", False) else None,
    }
    params = parse_params(args.param)
    if getattr(args, "resume", False) and not args.recipe and not args.models:
        from .resume import read_header

        recipe = Recipe.from_dict(read_header(Path(args.output))["recipe"], source=f"{args.output}.resume")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if params:
            changes["params"] = {**recipe.params, **params}
        return recipe.replace(**changes)
    if getattr(args, "models_dir", None) and not args.recipe:
        raise MergeError("--models-dir finds the models a recipe names; use it with --recipe FILE")
    if args.recipe:
        recipe = load_recipe(args.recipe, models_dir=getattr(args, "models_dir", None))
        if args.models:
            # Same count: model i stands in for recorded model i, so the recorded sha256 stay to
            # say which of them differ (the engine warns); another count is another merge.
            same = len(args.models) == len(recipe.models)
            recipe = recipe.replace(models=tuple(args.models), model_hashes=recipe.model_hashes if same else ())
        else:
            _check_recorded_models(recipe, args.recipe, getattr(args, "models_dir", None))
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
        vae=args.vae,
        loras=_loras_from_args(args),
        prediction=getattr(args, "allow_mixed_prediction", None),
        fp8_all=bool(getattr(args, "fp8_all", False)),
    )


def _loras_from_args(args: argparse.Namespace) -> tuple[dict, ...]:
    from .lora.merge import parse_weighted

    refs = getattr(args, "lora", None) or []
    weights = getattr(args, "lora_weights", None) or []
    if weights and len(weights) not in (1, len(refs)):
        raise MergeError(f"--lora-weights given {len(weights)} times for {len(refs)} --lora; give it once (for all) "
                         "or once per --lora")
    out = []
    for i, ref in enumerate(refs):
        path, strength = parse_weighted(ref)
        out.append({"path": path, "sha256": "", "strength": strength,
                    "weights": (weights[i] if len(weights) > 1 else weights[0]) if weights else None})
    return tuple(out)


def _check_recorded_models(recipe, source: str, models_dir: str | None) -> None:
    """Every model (and VAE) the recipe names must be there; a moved recipe says how to point at them."""
    from .errors import RecipeError
    from .inputs import parse_model_ref

    refs = [m for m in recipe.models if isinstance(parse_model_ref(m), str)] + ([recipe.vae] if recipe.vae else [])
    missing = [Path(m) for m in refs if not Path(m).exists()]
    if not missing:
        return
    where = f"in {models_dir} or " if models_dir else ""
    names = ", ".join(p.name for p in missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    raise RecipeError(
        f"{source}: {len(missing)} recorded model(s) not found {where}at {missing[0].parent}: {names}; "
        "pass --models-dir DIR (the folder they are in now) or give the models after `merge`"
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
    executor = executor_from_args(args)
    cancel = threading.Event()
    bar = _progress_bar()

    def on_sigint(signum, frame):  # first Ctrl-C: stop cleanly; the writer removes its temp file
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    threads, max_memory = args.threads, args.max_memory
    if args.resume:
        from .resume import read_header

        header = read_header(Path(args.output))  # same concurrency as the interrupted run unless told
        threads = threads or header.get("threads")
        max_memory = max_memory or header.get("max_memory")
    try:
        result = merge(
            recipe,
            args.output,
            threads=threads,
            overwrite=args.overwrite,
            progress=bar.update if bar else None,
            cancel=cancel,
            hash_inputs=not args.no_hash,
            hash_output=not args.no_hash,
            warn=lambda msg: print(f"warning: {msg}", file=sys.stderr),
            max_memory=max_memory,
            journal={"auto": None, "on": True, "off": False}[args.resume_file],
            resume=args.resume,
            on_plan=lambda text: print(text, flush=True),
            executor=executor,
        )
    except MergeError as exc:
        from .io.writer import temp_path_for
        from .resume import journal_path

        out = Path(args.output)
        if journal_path(out).exists() and temp_path_for(out).exists() and "--resume" not in str(exc):
            print(f"note: progress is kept; `python -m lib_merge merge --resume -o {out}` continues after the fix",
                  file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar:
            bar.close()
    size = result.bytes_written / 2**30
    resumed = f" (resumed: {result.resumed_keys} keys kept)" if result.resumed_keys else ""
    print(f"wrote {result.path} ({size:.2f} GiB) in {result.seconds:.1f} s{resumed}")
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
