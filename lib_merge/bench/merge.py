"""``python -m lib_merge bench merge``: merge throughput against the machine's I/O floor, and peak RSS.

Two synthetic fp16 checkpoints with the full-size key names and shapes are written, then each
contender runs in its own subprocess (so its peak RSS is its own, read from ``wait4``):
  (a) I/O floor — read both inputs once, write one output of the same size, fsync;
  (b) lib_merge weighted_sum (streaming engine, hashing off; hashing is timed separately);
  (c) whole-model baseline — safetensors ``load_file`` both, compute, ``save_file``;
  (d) sd-mecha ``weighted_sum`` when the package is installed (benchmark-only extra).
All runs see a warm page cache (the inputs were just written and are read once before timing).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import PACKAGE_PARENT

ALPHA = 0.5


def run_bench(args) -> int:
    from ..synthetic import write_synthetic_checkpoint

    folder = Path(args.dir).resolve()  # the workers start in another folder
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / f"bench_{args.arch}_a.safetensors", folder / f"bench_{args.arch}_b.safetensors"
    t0 = time.perf_counter()
    for index, path in enumerate((a, b)):
        if not path.exists():
            write_synthetic_checkpoint(path, args.arch, model=index, family=7)
    size = a.stat().st_size
    print(f"inputs: 2 × {size / 2**30:.2f} GiB fp16 {args.arch} (made in {time.perf_counter() - t0:.1f} s), "
          f"{os.cpu_count()} CPU cores")
    _worker("warm", a, b, folder / "unused")  # bring both inputs into the page cache

    rows: list[tuple[str, dict]] = []
    floor = _run("floor", a, b, folder / "floor_out.bin")
    rows.append(("(a) I/O floor: read 2 + write 1 + fsync", floor))
    threads = str(args.threads or 0)
    ours = _run("ours", a, b, folder / "ours.safetensors", threads, "durable")
    rows.append(("(b) lib_merge weighted_sum (fsync, as the CLI)", ours))
    if not args.skip_baseline:
        rows.append(("(c) load_file + save_file baseline", _run("baseline", a, b, folder / "baseline.safetensors")))
    try:
        import sd_mecha  # noqa: F401

        rows.append(("(d) sd-mecha weighted_sum", _run("mecha", a, b, folder / "mecha.safetensors")))
    except ImportError:
        rows.append(("(d) sd-mecha weighted_sum", {"skipped": "sd-mecha not installed (pip install sd-mecha)"}))

    cache_floor = _run("floor-cache", a, b, folder / "floor_out.bin")
    rows.append(("(a') page-cache floor: read 2 + write 1", cache_floor))
    ours_cache = _run("ours", a, b, folder / "ours.safetensors", threads, "cache")
    rows.append(("(b') lib_merge without fsync", ours_cache))

    base = floor["seconds"]
    print(f"{'contender':<44} {'wall s':>8} {'× floor':>8} {'peak RSS':>10}")
    for label, r in rows:
        if "skipped" in r:
            print(f"{label:<44} skipped: {r['skipped']}")
            continue
        print(f"{label:<44} {r['seconds']:>8.2f} {r['seconds'] / base:>8.2f} {r['rss'] / 2**30:>8.2f} GB")
    if "hash_seconds" in ours and args.arch:
        print(f"sha256 of the {size / 2**30:.2f} GiB output (printed by the CLI; cached for inputs): "
              f"{ours['hash_seconds']:.2f} s")
    ratio = ours["seconds"] / base
    print(f"without fsync: b'/a' = {ours_cache['seconds'] / cache_floor['seconds']:.2f} "
          "(the merge's own cost when the disk is not the limit)")
    print(f"targets: b/a ≤ 1.3 → {ratio:.2f} {'OK' if ratio <= 1.3 else 'MISSED'}; "
          f"peak RSS (b) ≤ 1.5 GB → {ours['rss'] / 2**30:.2f} GB {'OK' if ours['rss'] <= 1.5 * 2**30 else 'MISSED'}")
    for name in ("floor_out.bin", "ours.safetensors", "baseline.safetensors", "mecha.safetensors"):
        (folder / name).unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _run(kind: str, a: Path, b: Path, out: Path, *extra: str, module: str = "lib_merge.bench.merge") -> dict:
    """Run one contender in a fresh interpreter (``module``'s worker; other benchmarks reuse this
    runner and this module's floors); report its wall time and peak RSS."""
    out.unlink(missing_ok=True)
    log = out.with_name(out.name + ".log")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, kind, str(a), str(b), str(out), *extra],
            stdout=subprocess.PIPE,
            stderr=err,  # progress bars of the contenders stay out of the table
            text=True,
            cwd=PACKAGE_PARENT,
        )
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {kind} failed with status {proc.returncode}: {log.read_text()[-2000:]}")
    log.unlink(missing_ok=True)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["rss"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return result


def _worker(kind: str, a: Path, b: Path, out: Path, *extra: str) -> dict:
    started = time.perf_counter()
    result: dict = {}
    if kind in ("warm", "floor", "floor-cache"):
        buf = bytearray(16 * 1024 * 1024)
        total = 0
        for path in (a, b):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        if kind in ("floor", "floor-cache"):
            target = a.stat().st_size
            with open(out, "wb", buffering=0) as f:
                written = 0
                while written < target:
                    written += f.write(memoryview(buf)[: min(len(buf), target - written)])
                if kind == "floor":
                    os.fsync(f.fileno())
    elif kind == "ours":
        from ..engine import merge
        from ..recipe import Recipe

        threads = int(extra[0]) or None
        merged = merge(Recipe("weighted_sum", (str(a), str(b)), alpha=ALPHA), out, threads=threads,
                       hash_inputs=False, hash_output=False, durable=extra[1] == "durable", overwrite=True)
        result["bytes_read"] = merged.bytes_read
        result["seconds"] = time.perf_counter() - started
        from ..io.hashing import sha256_file

        t = time.perf_counter()
        sha256_file(out, use_cache=False)
        result["hash_seconds"] = time.perf_counter() - t
        return result
    elif kind == "baseline":
        from safetensors.torch import load_file, save_file

        sa, sb = load_file(str(a)), load_file(str(b))
        merged = {}
        for key, ta in sa.items():
            if ta.is_floating_point():
                merged[key] = (ta.float() + ALPHA * (sb[key].float() - ta.float())).to(ta.dtype)
            else:
                merged[key] = ta
        save_file(merged, str(out))
        _fsync(out)  # same durability as (a) and (b)
    elif kind == "mecha":
        import sd_mecha

        recipe = sd_mecha.weighted_sum(sd_mecha.model(str(a)), sd_mecha.model(str(b)), alpha=ALPHA)
        sd_mecha.merge(recipe, output=str(out), output_dtype=__import__("torch").float16)
        _fsync(out)
    result["seconds"] = time.perf_counter() - started
    return result


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    kind, a, b, out, *rest = sys.argv[1:]
    print(json.dumps(_worker(kind, Path(a), Path(b), Path(out), *rest)))
