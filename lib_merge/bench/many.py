"""``python -m lib_merge bench many 4,8,16``: N-model merges on full-size synthetic SD1.5 U-Nets.

For each N, each contender runs in a fresh interpreter (peak RSS from ``wait4``, as bench merge):
  dgmla            the streaming engine under --max-memory; wall time, peak RSS, bytes read,
                   the printed working-set bound, and per key the worker thread's CPU seconds
                   (split into DELLA/vote and geometric-median parts, with the update count)
  soup (re-average) the ``soup`` method over the N files
  soup add         one `add` into a pot that already holds N − 1 models (the pot is grown
                   between sizes with multi-model adds, which are not timed)
  soup export      the pot's average written as fp16
Then the DGMLA-216 SDXL run is projected from the per-key figures: RAM = our per-key bound for
the largest SDXL key with 216 models; core-hours = Σ over SDXL keys of (points × elements) × the
measured CPU cost per element-point, with the median at the measured and at the maximal (100)
number of updates.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import PACKAGE_PARENT, peak_rss_of, worker_result

FAMILY = 11
PUBLISHED = {"ram_tb": 3.5, "hours": 36.2, "threads": 48, "models": 216}


def run_many_bench(args) -> int:
    sizes = sorted({int(x) for x in str(args.many).split(",") if x.strip()})
    if not sizes or sizes[0] < 2:
        print("error: --many takes model counts ≥ 2, e.g. 4,8,16", file=sys.stderr)
        return 2
    folder = Path(args.dir).resolve() / "many"  # the workers start in another folder
    folder.mkdir(parents=True, exist_ok=True)
    top = sizes[-1]
    models = [folder / f"unet_{i:03d}.safetensors" for i in range(top)]
    _check_disk(folder, models)
    started = time.perf_counter()
    missing = [i for i, p in enumerate(models) if not p.exists()]
    with ThreadPoolExecutor(max_workers=max(1, min(len(missing), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda i: _call("make", {"path": str(models[i]), "model": i}), missing))
    model_size = models[0].stat().st_size
    print(f"inputs: {top} synthetic full-size SD1.5 U-Nets, {model_size / 2**30:.2f} GiB fp16 each "
          f"({len(missing)} made in {time.perf_counter() - started:.0f} s), {os.cpu_count()} CPU cores, "
          f"dgmla under --max-memory {args.max_memory}")
    idle = _call("idle", {})
    print(f"interpreter with torch and lib_merge imported: peak RSS {idle['rss'] / 2**30:.2f} GiB")
    threads = args.threads or 0
    rows = []
    pot = folder / "pot"
    shutil.rmtree(pot, ignore_errors=True)
    in_pot = 0
    for n in sizes:
        out = folder / f"dgmla_{n}.safetensors"
        dgmla = _call("dgmla", {"models": [str(p) for p in models[:n]], "out": str(out), "threads": threads,
                                "max_memory": args.max_memory})
        out.unlink(missing_ok=True)
        soup_out = folder / f"soup_{n}.safetensors"
        soup = _call("soup", {"models": [str(p) for p in models[:n]], "out": str(soup_out), "threads": threads})
        soup_out.unlink(missing_ok=True)
        if in_pot < n - 1:  # grow the pot to N − 1 (one pass, not timed)
            _call("pot-add", {"pot": str(pot), "models": [str(p) for p in models[in_pot:n - 1]], "threads": threads})
            in_pot = n - 1
        add = _call("pot-add", {"pot": str(pot), "models": [str(models[n - 1])], "threads": threads})
        in_pot = n
        export_out = folder / f"pot_{n}.safetensors"
        export = _call("pot-export", {"pot": str(pot), "out": str(export_out), "threads": threads})
        export_out.unlink(missing_ok=True)
        rows.append((n, dgmla, soup, add, export))
        _print_row(n, dgmla, soup, add, export, idle, model_size)
    shutil.rmtree(pot, ignore_errors=True)
    _projection(rows, idle)
    if not args.keep:
        for p in models:
            p.unlink(missing_ok=True)
    return 0


def _check_disk(folder: Path, models: list[Path]) -> None:
    need = sum(1719136888 for p in models if not p.exists()) + 16 * 2**30
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"error: the benchmark needs about {need / 2**30:.0f} GiB free in {folder}, "
                         f"{free / 2**30:.0f} GiB are; use --dir elsewhere or fewer models")


def _print_row(n, dgmla, soup, add, export, idle, model_size) -> None:
    base = idle["rss"]
    within = dgmla["rss"] - base <= dgmla["bound"]
    print(f"\nN = {n}")
    print(f"  dgmla          {dgmla['seconds']:8.1f} s  peak RSS {dgmla['rss'] / 2**30:6.2f} GiB "
          f"(working set {(dgmla['rss'] - base) / 2**30:.2f} ≤ printed bound {dgmla['bound'] / 2**30:.2f}: "
          f"{'OK' if within else 'EXCEEDED'})  read {dgmla['bytes_read'] / 2**30:.1f} GiB  "
          f"CPU {dgmla['cpu']:.0f} s (median {dgmla['median_cpu']:.0f} s, {dgmla['updates_mean']:.1f} updates/key avg, "
          f"max {dgmla['updates_max']})")
    print(f"  soup re-average {soup['seconds']:7.1f} s  peak RSS {soup['rss'] / 2**30:6.2f} GiB  "
          f"read {soup['bytes_read'] / 2**30:.1f} GiB ({n} models)")
    print(f"  soup add (1)   {add['seconds']:8.1f} s  peak RSS {add['rss'] / 2**30:6.2f} GiB  "
          f"read {add['model_bytes'] / 2**30:.2f} GiB of models ({add['models_read']} model) + "
          f"{add['pot_bytes'] / 2**30:.2f} GiB pot, wrote {add['written'] / 2**30:.2f} GiB")
    print(f"  soup export    {export['seconds']:8.1f} s  peak RSS {export['rss'] / 2**30:6.2f} GiB  "
          f"read {export['pot_bytes'] / 2**30:.2f} GiB pot, 0 models")
    print(f"  add vs re-average: {add['seconds'] / soup['seconds']:.2f}× the time, "
          f"{add['model_bytes'] / max(1, soup['bytes_read']):.2f}× the model bytes "
          f"({(add['model_bytes'] + add['pot_bytes']) / max(1, soup['bytes_read']):.2f}× all bytes read)")


def _projection(rows, idle) -> None:
    from ..arch import full_layout, get_arch
    from ..many import format_size
    from ..methods import get_method

    n, dgmla = rows[-1][0], rows[-1][1]
    per_point = dgmla["work"]  # Σ over keys of (task vectors × elements)
    fixed_cost = (dgmla["cpu"] - dgmla["median_cpu"]) / per_point  # Δ, DELLA ranks + masks, vote, cast, write
    update_cost = dgmla["median_cpu"] / per_point / max(1.0, dgmla["updates_mean"] + 1)  # one pass per update (+ start)
    layout = full_layout(get_arch("sdxl"))
    elements = sum(_numel(shape) for shape, kind in layout.values() if kind != "int")
    largest = max(_numel(shape) for shape, kind in layout.values())
    models = PUBLISHED["models"]
    copies = get_method("dgmla").fn.working_copies(models)
    key_ram = copies * 4 * largest + 2 * 2 * largest
    work = (models - 1) * elements
    hours_measured = work * (fixed_cost + update_cost * (dgmla["updates_mean"] + 1)) / 3600
    hours_worst = work * (fixed_cost + update_cost * 101) / 3600
    published_core_hours = PUBLISHED["hours"] * PUBLISHED["threads"]
    read_tb = models * 6.94e9 / 1e12
    print(f"\nDGMLA-216 SDXL projection (from N = {n}: {fixed_cost * 1e9:.2f} ns per element-point for drop/vote/IO, "
          f"{update_cost * 1e9:.2f} ns per element-point per median update):")
    print(f"  RAM: largest key ({largest / 1e6:.1f} M elements, TE2 token embedding) × {copies:g} fp32 copies "
          f"= {format_size(key_ram)} — one key at a time needs that; --max-memory 64G runs it alone and smaller keys "
          f"beside it; U-Net keys alone need ≤ {format_size(copies * 4 * 29491200 + 4 * 29491200)}")
    print(f"  CPU: {hours_measured:.0f} core-hours at {dgmla['updates_mean']:.1f} median updates/key "
          f"(synthetic data), {hours_worst:.0f} core-hours if every key ran all 100 updates; "
          f"= {hours_measured / PUBLISHED['threads']:.1f}–{hours_worst / PUBLISHED['threads']:.1f} h on "
          f"{PUBLISHED['threads']} threads, plus reading {read_tb:.2f} TB of inputs")
    print(f"  published: {PUBLISHED['ram_tb']} TB RAM (fp64), {PUBLISHED['hours']} h × {PUBLISHED['threads']} threads "
          f"= {published_core_hours:.0f} core-hours; RAM target ≤ 64 GB: "
          f"{'OK' if key_ram <= 64 * 10**9 else 'MISSED'} ({key_ram / 1e9:.1f} GB)")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- workers (each in its own interpreter) ----------------------------------------------------------
def _call(kind: str, payload: dict) -> dict:
    """Run one worker in a fresh interpreter; its wall-clock result plus its own peak RSS."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lib_merge.bench.many", kind, json.dumps(payload)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=PACKAGE_PARENT,
        )
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout:
            proc.stdout.close()
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"bench worker {kind} failed ({proc.returncode}): {err.read()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rss"] = peak_rss_of(result, usage)
    return result


def _worker(kind: str, payload: dict) -> dict:
    started = time.perf_counter()
    result: dict = {}
    if kind == "make":
        from ..synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(payload["path"], "sd1", unet_only=True, family=FAMILY, model=payload["model"])
    elif kind == "idle":  # the baseline: what importing torch and lib_merge alone costs
        import torch  # noqa: F401

        from .. import engine, soup  # noqa: F401
    elif kind in ("dgmla", "soup"):
        result = _merge_worker(kind, payload)
    elif kind == "pot-add":
        from ..soup import Pot

        pot_dir = Path(payload["pot"])
        pot = Pot(pot_dir) if (pot_dir / "manifest.json").exists() else Pot.init(pot_dir)
        old = pot.data.get("sums")
        pot_bytes = (pot_dir / old).stat().st_size if old else 0
        started = time.perf_counter()
        pot.add(payload["models"], threads=payload["threads"] or None)
        result["seconds"] = time.perf_counter() - started
        result["models_read"] = len(payload["models"])
        result["model_bytes"] = sum(Path(m).stat().st_size for m in payload["models"])
        result["pot_bytes"] = pot_bytes
        result["written"] = (pot_dir / pot.data["sums"]).stat().st_size
        return result
    elif kind == "pot-export":
        from ..soup import Pot

        pot = Pot(payload["pot"])
        pot.export(payload["out"], threads=payload["threads"] or None, hash_output=False)
        result["pot_bytes"] = (Path(payload["pot"]) / pot.data["sums"]).stat().st_size
    result["seconds"] = time.perf_counter() - started
    return result


def _merge_worker(kind: str, payload: dict) -> dict:
    import threading

    from .. import engine
    from ..engine import run as engine_run  # where execute looks produce_job up
    from ..methods import task_vector
    from ..recipe import Recipe

    per_key = {"cpu": 0.0, "median_cpu": 0.0, "work": 0, "updates": []}
    lock = threading.Lock()
    produce, gm = engine_run.produce_job, task_vector.geometric_median_rows

    def timed_produce(plan, job, counters=None):  # CPU seconds of the worker thread per key
        begin = time.thread_time()
        yield from produce(plan, job, counters)
        with lock:
            per_key["cpu"] += time.thread_time() - begin
            if job.action == "merge":
                per_key["work"] += (len(job.sources) - 1) * _numel(job.shape)

    def timed_median(*args, **kwargs):
        begin = time.thread_time()
        out = gm(*args, **kwargs)
        with lock:
            per_key["median_cpu"] += time.thread_time() - begin
            per_key["updates"].append(out[1])
        return out

    engine_run.produce_job, task_vector.geometric_median_rows = timed_produce, timed_median
    bound = {}
    result = engine.merge(
        Recipe(kind, tuple(payload["models"]), seed=241011), payload["out"], threads=payload["threads"] or None,
        max_memory=payload.get("max_memory"), hash_inputs=False, hash_output=False, overwrite=True,
        on_plan=lambda text: bound.setdefault("text", text),
    )
    updates = per_key["updates"] or [0]
    return {
        "seconds": result.seconds, "bytes_read": result.bytes_read, "bound": result.memory.bound if result.memory else 0,
        "plan": bound.get("text", ""), "cpu": per_key["cpu"], "median_cpu": per_key["median_cpu"],
        "work": per_key["work"], "updates_mean": sum(updates) / len(updates), "updates_max": max(updates),
    }


if __name__ == "__main__":
    print(worker_result(_worker(sys.argv[1], json.loads(sys.argv[2]))))
