"""The ``bench`` sub-command: ``bench [merge] …``, ``bench many N[,N…] …``, ``bench lora …``,
``bench live …`` and ``bench guidance …``. The last two keep their own option parsers (they also run as modules)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from . import KINDS

_PASS_THROUGH = ("live", "guidance")


def bench_argv(argv: List[str]) -> List[str]:
    """Earlier spellings keep working: ``bench [--arch sdxl]`` is ``bench merge``, and
    ``bench --many 4,8`` is ``bench many 4,8``."""
    if not argv or argv[0] != "bench" or (len(argv) > 1 and argv[1] in KINDS) or "-h" in argv[1:2] \
            or "--help" in argv[1:2]:
        return argv
    rest = argv[1:]
    for flag in ("--many",):
        for i, token in enumerate(rest):
            if token == flag and i + 1 < len(rest):
                return ["bench", "many", rest[i + 1], *rest[:i], *rest[i + 2:]]
            if token.startswith(flag + "="):
                return ["bench", "many", token.split("=", 1)[1], *rest[:i], *rest[i + 1:]]
    return ["bench", "merge", *rest]


def bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="speed and memory benchmarks: " + ", ".join(KINDS),
                           description="Benchmarks print wall time against the floor of the same work, and peak RSS.")
    kinds = bench.add_subparsers(dest="bench", metavar="{" + ",".join(KINDS) + "}", required=True)

    merge = kinds.add_parser("merge", help=KINDS["merge"])
    merge.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    merge.add_argument("--methods", default="weighted_sum", metavar="M[,M…]",
                       help="methods to time, e.g. weighted_sum,add_difference,slerp,ties,dare,della,"
                            "geometric_median,train_difference (default weighted_sum)")
    merge.add_argument("--scale", type=int, default=1, metavar="N",
                       help="divide the layer widths by N (a quick run on small files; default 1 = full size)")
    merge.add_argument("--skip-baseline", action="store_true", help="skip the whole-model load_file baseline")
    merge.add_argument("--skip-mecha", action="store_true", help="skip sd-mecha even when it is installed")

    many = kinds.add_parser("many", help=KINDS["many"])
    many.add_argument("many", metavar="N[,N…]", help="model counts, e.g. 4,8,16")
    many.add_argument("--max-memory", default="3G", help="working-set cap for dgmla (default 3G)")

    lora = kinds.add_parser("lora", help=KINDS["lora"])
    lora.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    lora.add_argument("--rank", type=int, default=64, help="rank of the baked and of the extracted LoRA (default 64)")
    lora.add_argument("--scale", type=int, default=1, metavar="N",
                      help="divide the layer widths by N (a quick run on small files; default 1 = full size)")
    lora.add_argument("--svd", default="full,randomized", metavar="KIND[,KIND…]",
                      help="extractions to time: full, randomized, both (default) or none")

    ray = kinds.add_parser("ray", help=KINDS["ray"])
    ray.add_argument("--models", type=int, default=5, help="dgmla inputs: a base and N − 1 fine-tunes (default 5)")
    ray.add_argument("--scale", type=int, default=4, metavar="N", help="divide the U-Net widths by N (default 4)")
    ray.add_argument("--workers", default="1,2", metavar="K[,K…]", help="Ray worker counts (default 1,2)")
    ray.add_argument("--shard-size", default="16M", help="input bytes per Ray task (default 16M)")

    for parser in (merge, many, lora, ray):
        parser.add_argument("--dir", default="bench_tmp", help="scratch folder (needs ~3× a checkpoint of free space)")
        parser.add_argument("--threads", type=int)
        parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")

    for name in _PASS_THROUGH:
        kinds.add_parser(name, help=KINDS[name], add_help=False).add_argument(
            "args", nargs=argparse.REMAINDER, help=f"options of `bench {name}` (bench {name} --help)")


def run_pass_through(argv: List[str]) -> Optional[int]:
    """``bench live …`` / ``bench guidance …`` go to their own parsers whole (argparse would take
    their leading options, ``--help`` included, for ours)."""
    if len(argv) < 2 or argv[0] != "bench" or argv[1] not in _PASS_THROUGH:
        return None
    if argv[1] == "live":
        from .live import main
    else:
        from .guidance import main
    return main(argv[2:]) or 0


def run_benchmark(args) -> int:
    if args.bench == "merge":
        from .merge import run_bench

        return run_bench(args)
    if args.bench == "many":
        from .many import run_many_bench

        return run_many_bench(args)
    if args.bench == "ray":
        from .ray_bench import run_ray_bench

        return run_ray_bench(args)
    if args.bench == "lora":
        from .lora import run_lora_bench

        return run_lora_bench(args)
    raise AssertionError(f"bench {args.bench} runs through run_pass_through")
