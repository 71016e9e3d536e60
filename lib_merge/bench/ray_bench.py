"""``python -m lib_merge bench ray [--models N] [--scale S] [--workers 1,2]``: a many-model dgmla on
the local executor and on a local Ray instance with 1, 2, … workers, on synthetic SD1.5 U-Nets
(layer widths ÷ S). Each run's output must be byte-identical to the local one.

Per Ray run it prints: wall time (first shard submitted → last returned; the instance's start is
shown apart), the shards, the Ray overhead per shard — (wall × workers − Σ the tasks' own
seconds) / shards: scheduling, the result's round trip, a fresh worker's imports and the
driver's bookkeeping — and each worker process's peak RSS against the plan's per-worker bound.
Then the per-key cost it measured (ns per element and fine-tune) feeds the DGMLA-216 SDXL
projection across k nodes (docs/distributed.md)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

FAMILY = 13
SEED = 241011
SDXL_PARAMS = 3.47e9  # elements of one SDXL checkpoint (U-Net + both text encoders + VAE)
SDXL_BYTES = 6.94e9  # one fp16 SDXL checkpoint
LARGEST_KEY = 63.2e6  # TE2's token embedding, the largest SDXL key (elements)
MODELS = 216


def run_ray_bench(args) -> int:
    from ..engine import merge
    from ..engine.ray_executor import RayExecutor, import_ray
    from ..many import format_size, parse_size
    from ..recipe import Recipe
    from ..synthetic import write_synthetic_checkpoint

    import_ray()
    workers = sorted({int(x) for x in str(args.workers).split(",") if x.strip()})
    folder = Path(args.dir).resolve() / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = []
    for i in range(args.models):
        path = folder / f"unet_{args.scale}_{i:02d}.safetensors"
        if not path.exists():
            write_synthetic_checkpoint(path, "sd1", unet_only=True, width_divisor=args.scale, family=FAMILY, model=i)
        paths.append(str(path))
    recipe = Recipe("dgmla", tuple(paths), seed=SEED)
    size = Path(paths[0]).stat().st_size
    print(f"inputs: {args.models} synthetic SD1.5 U-Nets at width ÷ {args.scale}, {size / 2**20:.0f} MiB each "
          f"(made in {time.perf_counter() - started:.0f} s); dgmla, shards of {args.shard_size}, "
          f"{args.threads or 1} thread(s) per worker")
    threads = args.threads or 1
    local_out = folder / "local.safetensors"
    plan_text: dict[str, str] = {}
    result = merge(recipe, local_out, threads=threads, overwrite=True, hash_inputs=False,
                   on_plan=lambda text: plan_text.setdefault("text", text))
    reference = local_out.read_bytes()
    bound = result.memory.bound if result.memory else 0
    elements = sum(_numel(t) for t in _shapes(paths[0]))
    work = elements * (args.models - 1)
    per_point = result.seconds * threads / work
    print(f"local  {threads} thread(s): {result.seconds:7.1f} s  ({per_point * 1e9:.1f} ns per element and fine-tune; "
          f"per-worker bound {format_size(bound)})")
    for k in workers:
        executor = RayExecutor(shard_bytes=parse_size(args.shard_size), num_cpus=k)
        out = folder / f"ray_{k}.safetensors"
        begin = time.perf_counter()
        merge(recipe, out, threads=threads, overwrite=True, hash_inputs=False, executor=executor)
        total = time.perf_counter() - begin
        stats = executor.stats
        same = out.read_bytes() == reference
        out.unlink()
        overhead = (stats.wall * k - sum(stats.task_seconds)) / max(1, stats.shards)
        rss = sorted(stats.peak_rss.values())
        print(f"ray    {k} worker(s): {stats.wall:7.1f} s  (+{total - stats.wall:.1f} s starting Ray and planning), "
              f"{stats.shards} shards, tasks {sum(stats.task_seconds):.1f} s, overhead {overhead * 1e3:.0f} ms/shard, "
              f"worker peak RSS {', '.join(format_size(r) for r in rss)} (bound {format_size(bound)}), "
              f"byte-identical: {'yes' if same else 'NO'}")
        if not same:
            print("error: the Ray output differs from the local one", file=sys.stderr)
            return 1
    local_out.unlink(missing_ok=True)
    _projection(per_point)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _projection(per_point: float, node_cores: int = 16, node_ram_gb: int = 128, gbit: float = 10.0) -> None:
    """DGMLA-216 on SDXL across k nodes from the measured cost per element and fine-tune: each
    node reads 1/k of the inputs over the network and computes 1/k of the keys; the largest key
    runs whole on one worker, so it bounds the wall time from below."""
    copies = MODELS - 1 + 6  # dgmla: P task vectors + 6 fp32 working copies (docs/many-models.md)
    key_ram = copies * 4 * LARGEST_KEY + 2 * 2 * LARGEST_KEY
    core_hours = per_point * (MODELS - 1) * SDXL_PARAMS / 3600
    longest = per_point * (MODELS - 1) * LARGEST_KEY
    read = MODELS * SDXL_BYTES
    print(f"\nDGMLA-216 SDXL projection ({per_point * 1e9:.1f} ns per element and fine-tune measured here; nodes of "
          f"{node_cores} cores, {node_ram_gb} GB RAM, {gbit:g} Gbit/s to the shared storage): "
          f"{core_hours:.0f} core-hours, the largest key alone {longest / 60:.0f} min on one core")
    for k in (1, 4, 16, 64):
        net = read / k
        hours = max(core_hours / (k * node_cores), longest / 3600) + net / (gbit / 8 * 1e9) / 3600
        print(f"  k = {k:2d}: per-node RAM ≤ {key_ram / 1e9:.0f} GB working set (largest key) — run with "
              f"--max-memory {int(node_ram_gb * 0.8)}G; wall ≈ {hours:.1f} h; network read per node "
              f"{net / 1e12:.2f} TB")


def _shapes(path: str):
    from ..io.reader import open_checkpoint

    with open_checkpoint(path) as reader:
        return [info.shape for info in reader.infos.values()]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
