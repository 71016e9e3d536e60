"""The ``soup`` sub-command: ``init``, ``add``, ``remove``, ``reweight``, ``show`` and ``export``
of a pot (see the package docstring)."""
from __future__ import annotations

import argparse
import sys


def add_soup_parser(sub) -> None:
    s = sub.add_parser(
        "soup",
        help="incremental soups: a pot of running sums; add/remove/reweight read only that one model",
        description="A pot (a folder) keeps Σ wᵢθᵢ per key in float64 and the ingredient list, so models can be "
        "added, removed or reweighted without re-reading the others; export writes the weighted average.",
    )
    ss = s.add_subparsers(dest="soup_command", required=True)
    si = ss.add_parser("init", help="create an empty pot")
    si.add_argument("pot")
    si.add_argument("--base", help="base model: fixes the architecture and the copied keys; allows export --scale")
    sa = ss.add_parser("add", help="add one or more models (one pass over the pot)")
    sa.add_argument("pot")
    sa.add_argument("models", nargs="+")
    sa.add_argument("--weight", type=float, default=1.0, help="weight of each added model (default 1)")
    sr = ss.add_parser("remove", help="subtract models that are in the pot (needs the files)")
    sr.add_argument("pot")
    sr.add_argument("models", nargs="+")
    sw = ss.add_parser("reweight", help="change one ingredient's weight (needs the file)")
    sw.add_argument("pot")
    sw.add_argument("model")
    sw.add_argument("weight", type=float)
    sh = ss.add_parser("show", help="ingredients, weights, hashes, architecture")
    sh.add_argument("pot")
    sh.add_argument("--verify", action="store_true", help="also check every stored byte against its checksum")
    se = ss.add_parser("export", help="write the weighted average as a checkpoint")
    se.add_argument("pot")
    se.add_argument("-o", "--output", required=True)
    se.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    se.add_argument("--scale", type=float, default=1.0, help="pots with a base: base + scale·(average − base)")
    se.add_argument("--overwrite", action="store_true")
    se.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="where keys run: local threads (default) or Ray tasks (docs/distributed.md)")
    se.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster; default: a local Ray instance")
    se.add_argument("--shard-size", metavar="SIZE", help="with --executor ray: pot bytes one task reads (default 256M)")
    for p in (sa, sr, sw, sh, se):
        p.add_argument("--threads", type=int)



def run_soup(args: argparse.Namespace) -> int:
    from ..engine.pool import cap_threads
    from .pot import Pot

    command = args.soup_command
    threads = cap_threads(getattr(args, "threads", None), lambda msg: print(f"note: {msg}", file=sys.stderr))
    if command == "init":
        pot = Pot.init(args.pot, base=args.base)
        print(pot.describe())
        return 0
    pot = Pot(args.pot)
    if command == "add":
        added = pot.add(args.models, args.weight, threads=threads)
        print(f"added {', '.join(a.name for a in added)} (weight {args.weight:g} each)")
    elif command == "remove":
        gone = pot.remove(args.models, threads=threads)
        print(f"removed {', '.join(g.name for g in gone)}")
    elif command == "reweight":
        member = pot.reweight(args.model, args.weight, threads=threads)
        print(f"{member.name}: weight {member.weight:g} → {args.weight:g}")
    elif command == "show":
        if args.verify:
            pot.verify(threads)
        print(pot.describe())
        if args.verify:
            print("  checksums: all stored bytes verified")
        return 0
    elif command == "export":
        from ..engine.executors import make_executor
        from ..many import parse_size

        executor = make_executor(args.executor, address=args.ray_address,
                                 shard_bytes=parse_size(args.shard_size) if args.shard_size else None)
        path, digest = pot.export(args.output, dtype=args.dtype, scale=args.scale, overwrite=args.overwrite,
                                  threads=threads, executor=executor)
        print(f"wrote {path} ({len(pot.ingredients)} ingredients, total weight {pot.total_weight:g})")
        if digest:
            print(f"sha256 {digest}")
        return 0
    print(pot.describe())
    return 0
