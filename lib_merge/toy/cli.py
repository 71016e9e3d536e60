"""The ``toy`` sub-command: ``train`` the toy family, ``sample`` a grid from a toy checkpoint,
``evidence`` (train if needed, then measure and write docs/evidence.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_toy_parser(sub) -> None:
    t = sub.add_parser(
        "toy", help="CPU-trained toy models in the SD1 layout: train, sample, measure (docs/toy.md)",
        description="A family of small pixel-space text-to-image models in the real SD1 checkpoint layout, trained "
        "on procedural shapes, so merges, soups and guidance can be judged by what they draw.",
    )
    ts = t.add_subparsers(dest="toy_command", required=True)
    tr = ts.add_parser("train", help="pretrain a base, fine-tune one model per shard, and a paragon with equal compute")
    tr.add_argument("--out", default="toy_models", help="folder for the family (default toy_models)")
    tr.add_argument("--plan", choices=("full", "quick"), default="full")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--base-steps", type=int)
    tr.add_argument("--shard-steps", type=int)
    tr.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    tr.add_argument("--export-pretrained", metavar="DIR",
                    help="also write the demo's two models (fp16 toy-round, toy-square) into DIR, e.g. lib_merge/toy/pretrained")
    sa = ts.add_parser("sample", help="a PNG grid from one toy checkpoint through the guidance stack")
    sa.add_argument("model")
    sa.add_argument("-o", "--output", required=True, help="PNG path")
    sa.add_argument("--prompt", action="append", default=[], help="caption (repeatable); none: untitled")
    sa.add_argument("--untitled", choices=("off", "empty", "zero", "gibberish"), default=None)
    sa.add_argument("-n", "--count", type=int, default=8, help="images per prompt")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--steps", type=int, default=20)
    sa.add_argument("--sampler", choices=("euler", "euler_a", "dpmpp_2m", "ddim"), default="euler")
    sa.add_argument("--cfg", type=float, default=5.0)
    sa.add_argument("--cfgpp", type=float, default=0.0, help="CFG++ λ (0 = off)")
    sa.add_argument("--pag", type=float, default=0.0, help="PAG scale")
    sa.add_argument("--seg", type=float, default=0.0, help="SEG scale (σ = ∞)")
    sa.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these models are too small for two to pay off, and on a busy "
                    "machine two wait on each other)")
    ev = ts.add_parser("evidence", help="train (or reuse) the family, run every comparison, write docs/evidence.md")
    ev.add_argument("--quick", action="store_true", help="tiny settings (≈ 3 min): checks the pipeline, not the claims")
    ev.add_argument("--work", default=None, help="folder for models and intermediate files (default toy_evidence[_quick])")
    ev.add_argument("--out", default=None, help="Markdown report (default docs/evidence.md; quick: WORK/evidence.md)")
    ev.add_argument("--threads", type=int, default=2)


def run_toy(args: argparse.Namespace) -> int:
    if args.toy_command == "train":
        return _train(args)
    if args.toy_command == "sample":
        return _sample(args)
    from .evidence import run_evidence

    work = Path(args.work or ("toy_evidence_quick" if args.quick else "toy_evidence"))
    out = Path(args.out) if args.out else (work / "evidence.md" if args.quick else Path("docs/evidence.md"))
    run_evidence(work, out, quick=args.quick, threads=args.threads)
    print(f"evidence: {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .family import plan_with, train_family

    plan = plan_with(args.plan, seed=args.seed, base_steps=args.base_steps, shard_steps=args.shard_steps)
    bars = lambda stem, total: tqdm(total=total, desc=stem, unit="step", file=sys.stderr, leave=False)  # noqa: E731
    manifest = train_family(Path(args.out), plan, threads=args.threads,
                            log=lambda m: print(m, file=sys.stderr), progress_factory=bars)
    for stem, entry in manifest["models"].items():
        print(f"{entry['sha256']}  {Path(args.out) / entry['file']}")
    if args.export_pretrained:
        from .family import export_pretrained

        for name, sha in export_pretrained(Path(args.out), Path(args.export_pretrained)).items():
            print(f"{sha}  {Path(args.export_pretrained) / (name + '.safetensors')}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .model import load_toy_checkpoint
    from .png import grid, write_png
    from .sampling import sample, toy_guidance

    import torch

    torch.set_num_threads(max(1, args.threads))
    model = load_toy_checkpoint(args.model)
    untitled = args.untitled or ("off" if args.prompt else "empty")
    prompts = args.prompt or [""]
    settings = toy_guidance(cfgpp=args.cfgpp, pag_scale=args.pag, seg_scale=args.seg)
    rows = [sample(model, [p] * args.count, seed=args.seed, steps=args.steps, sampler=args.sampler,
                   cfg_scale=args.cfg, settings=settings, untitled=untitled) for p in prompts]
    path = write_png(args.output, grid(rows))
    print(f"grid: {path}")
    return 0
