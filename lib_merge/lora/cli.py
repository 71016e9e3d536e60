"""The LoRA sub-commands: ``extract`` (a LoRA of B − A) and ``lora-merge`` (several LoRAs into one).
Baking (``merge … --lora``) is an option of ``merge``."""
from __future__ import annotations

import argparse


def add_lora_parsers(sub) -> None:
    x = sub.add_parser("extract", help="extract a LoRA of B − A (kohya layout, loads in A1111 and Forge)")
    x.add_argument("a", help="the base model A")
    x.add_argument("b", help="the fine-tune B")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--rank", type=int, default=64, help="rank of Linear and 1×1 layers (default 64)")
    x.add_argument("--conv-rank", type=int, help="also extract 3×3 convs (LoCon) at this rank")
    x.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this fraction of ‖B−A‖_F (≤ --rank)")
    x.add_argument("--clamp-quantile", type=float, help="clamp the factors at this quantile (kohya: 0.99; default off)")
    x.add_argument("--text-encoders", action="store_true", help="extract the text encoders too (skipped if unchanged)")
    x.add_argument("--svd", choices=("full", "randomized"), default="full",
                   help="randomized: seeded sketch + 4 power iterations + 10 oversampling (faster on big layers)")
    x.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    x.add_argument("--threads", type=int, default=2)
    x.add_argument("--overwrite", action="store_true")

    lm = sub.add_parser("lora-merge", help="merge LoRAs into one: exact rank concatenation, or SVD to --rank")
    lm.add_argument("loras", nargs="+", metavar="L[:W]")
    lm.add_argument("-o", "--output", required=True)
    lm.add_argument("--rank", type=int, help="re-compress each module to this rank by SVD (needed for LoHa/LoKr/full)")
    lm.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    lm.add_argument("--overwrite", action="store_true")


def run_extract(args: argparse.Namespace) -> int:
    from .extract import ExtractOptions, extract_lora

    report = extract_lora(args.a, args.b, args.output, ExtractOptions(
        rank=args.rank, conv_rank=args.conv_rank, energy=args.energy, clamp_quantile=args.clamp_quantile,
        text_encoders=args.text_encoders, randomized=args.svd == "randomized", dtype=args.dtype,
        threads=max(1, args.threads)), overwrite=args.overwrite)
    print(report.describe())
    return 0


def run_lora_merge(args: argparse.Namespace) -> int:
    import torch

    from ..errors import BadParameterError
    from .merge import merge_loras, parse_weighted

    if args.rank is not None and args.rank < 1:
        raise BadParameterError("--rank must be ≥ 1")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    report = merge_loras([parse_weighted(r) for r in args.loras], args.output, rank=args.rank,
                         overwrite=args.overwrite, dtype=dtype)
    how = f"rank ≤ {args.rank}, retained energy {report.retained:.4f}" if args.rank else f"concatenated, rank {max(report.ranks)}"
    print(f"wrote {report.path}: {report.modules} modules ({how})")
    return 0
