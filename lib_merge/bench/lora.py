"""``python -m lib_merge bench lora``: baking a LoRA and extracting one, against the I/O floor.

Two synthetic fp16 checkpoints with the full-size key names and shapes (``--scale N`` divides the
widths, for a quick run) and one rank-``--rank`` LoRA over every U-Net and text-encoder layer are
written, then each contender runs in its own interpreter (peak RSS its own, from ``wait4``):
  (a) I/O floor of a plain 2-model merge — read 2 + write 1 + fsync (``bench merge``'s worker);
  (b) bake: ``merge A --lora L`` (fsync, as the CLI);
  (b2) a 2-model weighted_sum with the LoRA baked in the same pass;
  (c) extract a rank-``--rank`` LoRA of B − A (U-Net and text encoders) by full SVD, then by
      randomized SVD: time, and the relative error ‖Δ − Δ_r‖/‖Δ‖ over all modules.
The synthetic B − A is Gaussian noise, a flat spectrum: the hardest case for a randomized SVD and
a low retained energy for any rank; real fine-tunes concentrate their change in fewer directions.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

from . import worker_result
from .merge import _run

ALPHA = 0.5
WORKER = "lib_merge.bench.lora"


def run_lora_bench(args) -> int:
    from safetensors.torch import save_file

    from ..io.reader import open_checkpoint
    from ..lora.synthetic import synthetic_lora
    from ..synthetic import write_synthetic_checkpoint

    folder = Path(args.dir).resolve()  # the workers start in another folder
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{args.arch}_s{args.scale}"
    a, b = folder / f"lora_{tag}_a.safetensors", folder / f"lora_{tag}_b.safetensors"
    lora = folder / f"lora_{tag}_r{args.rank}.safetensors"
    t0 = time.perf_counter()
    for index, path in enumerate((a, b)):
        if not path.exists():
            write_synthetic_checkpoint(path, args.arch, model=index, family=7, width_divisor=args.scale)
    if not lora.exists():
        with open_checkpoint(a) as reader:
            tensors = synthetic_lora(reader.shapes(), args.arch, rank=args.rank, seed=5)
        # trainers save fp16; 0.1-scaled factors keep the deltas near the weights' own size
        save_file({k: v.half() for k, v in tensors.items()}, str(lora))
        del tensors
    size = a.stat().st_size
    print(f"inputs: 2 × {size / 2**30:.2f} GiB fp16 {args.arch}"
          f"{f' (widths ÷ {args.scale})' if args.scale > 1 else ''}, LoRA rank {args.rank} "
          f"{lora.stat().st_size / 2**20:.0f} MiB (made in {time.perf_counter() - t0:.1f} s), "
          f"{os.cpu_count()} CPU cores, load average {_loadavg()}")
    _run("warm", a, b, folder / "unused")  # both inputs into the page cache
    threads = str(args.threads or 0)

    rows: list[tuple[str, dict]] = []
    floor = _run("floor", a, b, folder / "floor_out.bin")
    rows.append(("(a) I/O floor: read 2 + write 1 + fsync", floor))
    bake = _run("bake", a, lora, folder / "bake.safetensors", threads, module=WORKER)
    rows.append(("(b) bake: merge A --lora L", bake))
    both = _run("bake2", a, b, folder / "bake2.safetensors", threads, str(lora), module=WORKER)
    rows.append(("(b2) weighted_sum A B --lora L", both))
    extract = {}
    for svd in _svd_kinds(args.svd):
        extract[svd] = _run("extract", a, b, folder / f"extract_{svd}.safetensors", threads, svd, str(args.rank),
                            module=WORKER)
        rows.append((f"(c) extract rank {args.rank}, {svd} SVD", extract[svd]))

    base = floor["seconds"]
    print(f"{'contender':<44} {'wall s':>8} {'× floor':>8} {'peak RSS':>10}")
    for label, r in rows:
        print(f"{label:<44} {r['seconds']:>8.2f} {r['seconds'] / base:>8.2f} {r['rss'] / 2**30:>8.2f} GB")
    for svd, r in extract.items():
        print(f"extract, {svd} SVD: {r['modules']} modules; relative error ‖Δ−Δr‖/‖Δ‖ {r['error']:.6f}")
    if len(extract) == 2:
        full, rand = extract["full"], extract["randomized"]
        print(f"randomized: {rand['error'] / full['error']:.4f}× the optimal error in "
              f"{rand['seconds'] / full['seconds']:.2f}× the time")
    ratio = bake["seconds"] / base
    print(f"targets: bake/a ≤ 1.5 → {ratio:.2f} {'OK' if ratio <= 1.5 else 'MISSED'}; "
          f"peak RSS (b) ≤ 2 GB → {bake['rss'] / 2**30:.2f} GB {'OK' if bake['rss'] <= 2 * 2**30 else 'MISSED'}; "
          f"load average now {_loadavg()}")
    for name in ("floor_out.bin", "bake.safetensors", "bake2.safetensors", "extract_full.safetensors",
                 "extract_randomized.safetensors"):
        (folder / name).unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _svd_kinds(text: str) -> list[str]:
    from ..errors import BadParameterError

    kinds = [part.strip() for part in (text or "").split(",") if part.strip()]
    if kinds == ["none"]:
        return []
    unknown = [k for k in kinds if k not in ("full", "randomized")]
    if unknown or not kinds:
        raise BadParameterError(f"--svd {text!r}: give full, randomized, both (full,randomized) or none")
    return list(dict.fromkeys(kinds))


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _worker(kind: str, a: Path, b: Path, out: Path, *extra: str) -> dict:
    from ..engine import merge
    from ..recipe import Recipe

    started = time.perf_counter()
    result: dict = {}
    threads = int(extra[0]) or None
    if kind in ("bake", "bake2"):
        models, lora = ((str(a),), b) if kind == "bake" else ((str(a), str(b)), Path(extra[1]))
        recipe = Recipe("weighted_sum", models, alpha=ALPHA,
                        loras=({"path": str(lora), "sha256": "", "strength": 1.0, "weights": None},))
        merge(recipe, out, threads=threads, hash_inputs=False, hash_output=False, durable=True, overwrite=True)
    elif kind == "extract":
        from ..lora.extract import ExtractOptions, extract_lora

        report = extract_lora(a, b, out, ExtractOptions(rank=int(extra[2]), text_encoders=True,
                                                         randomized=extra[1] == "randomized", threads=threads or 2),
                              overwrite=True)
        kept = sum(k for k, _ in report.energy.values())
        total = sum(t for _, t in report.energy.values())
        result["modules"] = report.modules
        result["error"] = math.sqrt(max(0.0, total - kept) / total) if total else 0.0
    else:
        raise SystemExit(f"unknown bench lora worker {kind!r}")
    result["seconds"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    kind, a, b, out, *rest = sys.argv[1:]
    print(worker_result(_worker(kind, Path(a), Path(b), Path(out), *rest)))
