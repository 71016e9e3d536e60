"""``python -m lib_merge bench merge``: each merge method against the machine's I/O floors, and peak RSS.

Synthetic fp16 checkpoints with the full-size key names and shapes are written (``--scale N``
divides the widths, for a quick run), then each contender runs in its own interpreter (so its
peak RSS is its own, read from ``wait4``), each on a page cache warmed just before it:
  * durable floor — read the method's inputs once, write one output of the same size, fsync;
  * page-cache floor — the same without the fsync;
  * lib_merge, each method of ``--methods`` as the CLI runs it (fsync, output sha256);
  * the whole-model baseline — safetensors ``load_file`` both, compute, ``save_file`` (weighted_sum);
  * sd-mecha for the methods it has, when it is installed (a benchmark-only extra).
Two-input methods read A B; add_difference, train_difference and the task-vector methods (base
A, task models B C) read three, and are held against the floors of three inputs.
Seconds are the work inside each interpreter (the merge call, or the floor's reads and writes),
not its start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import PACKAGE_PARENT, peak_rss_of, worker_result

ALPHA = 0.5
DEFAULT_METHODS = "weighted_sum"
# methods whose α the benchmark sets (the others run at their defaults, α = 1)
_ALPHA_METHODS = {"weighted_sum", "slerp", "add_difference", "train_difference"}
# sd-mecha's counterpart of each method: the same formula, except where the note says what differs
_MECHA = {
    "weighted_sum": "",
    "slerp": "",
    "add_difference": "",
    "train_difference": "",
    "ties": "",
    "geometric_median": "",
    # sd-mecha's only DARE/DELLA merges elect signs after the drop (our vote=sum); ours default to no vote
    "dare": "≈ their add_ties_with_dare (vote after the drop)",
    "della": "≈ their add_ties_with_dare (vote after the drop)",
}


def run_bench(args) -> int:
    from ..errors import BadParameterError
    from ..synthetic import write_synthetic_checkpoint

    methods = _parse_methods(args.methods or DEFAULT_METHODS)
    scale = getattr(args, "scale", 1) or 1
    if scale < 1:
        raise BadParameterError(f"--scale {scale}: use 1 (full size) or more")
    folder = Path(args.dir).resolve()  # the workers start in another folder
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{args.arch}" + (f"_s{scale}" if scale > 1 else "")
    inputs = [folder / f"bench_{tag}_{name}.safetensors" for name in "abc"[:max(n for n in methods.values())]]
    t0 = time.perf_counter()
    for index, path in enumerate(inputs):
        if not path.exists():
            write_synthetic_checkpoint(path, args.arch, model=index, family=7, width_divisor=scale)
    size = inputs[0].stat().st_size
    print(f"inputs: {len(inputs)} × {size / 2**30:.2f} GiB fp16 {args.arch}"
          f"{f' (widths ÷ {scale})' if scale > 1 else ''} (made in {time.perf_counter() - t0:.1f} s), "
          f"{os.cpu_count()} CPU cores, load average {_loadavg()}")
    def warm() -> None:
        # before every timed run: a contender that needs GBs (sd-mecha's DELLA peaks at 5 GB)
        # can push the inputs out of the page cache, and the next one would pay for the disk
        _run("warm", inputs[0], inputs[1], folder / "unused", *map(str, inputs[2:]))

    warm()
    threads = str(args.threads or 0)
    floors: dict[int, tuple[dict, dict]] = {}
    for n in sorted(set(methods.values()) | {2}):  # the plain weighted_sum row is always held against 2
        extra = [str(p) for p in inputs[2:n]]
        floors[n] = (_run("floor", inputs[0], inputs[1], folder / "floor_out.bin", *extra),
                     _run("floor-cache", inputs[0], inputs[1], folder / "floor_out.bin", *extra))
    mecha = "skipped (--skip-mecha)" if getattr(args, "skip_mecha", False) else _mecha_available()
    warm()
    plain = _ours(inputs, folder, threads, "weighted_sum", 2, "durable")
    # every × plain refers to it, so it is shown even when not asked for (sd-mecha is not run for it then)
    rows = [] if "weighted_sum" in methods else [("weighted_sum", 2, plain, None, mecha or "not in --methods")]
    for method, n in methods.items():
        if method != "weighted_sum":
            warm()
        ours = plain if method == "weighted_sum" else _ours(inputs, folder, threads, method, n, "durable")
        theirs = None
        if mecha is None and method in _MECHA:
            warm()
            theirs = _run("mecha", inputs[0], inputs[1], folder / "mecha.safetensors", method, *map(str, inputs[2:n]))
        rows.append((method, n, ours, theirs, mecha or ("no counterpart" if theirs is None else _MECHA[method])))
    warm()
    rows.append(("weighted_sum, no fsync", 2, _ours(inputs, folder, threads, "weighted_sum", 2, "cache"), None, ""))
    if not args.skip_baseline:
        warm()
        rows.append(("load_file + save_file (weighted_sum)", 2,
                     _run("baseline", inputs[0], inputs[1], folder / "baseline.safetensors"), None, ""))

    print(_table(rows, floors, plain))
    ratio = plain["seconds"] / floors[2][0]["seconds"]
    print(f"targets: weighted_sum ≤ 1.3 × durable floor → {ratio:.2f} {'OK' if ratio <= 1.3 else 'MISSED'}; "
          f"peak RSS ≤ 1.5 GB → {plain['rss'] / 2**30:.2f} GB {'OK' if plain['rss'] <= 1.5 * 2**30 else 'MISSED'}; "
          f"load average now {_loadavg()}")
    for name in ("floor_out.bin", "ours.safetensors", "baseline.safetensors", "mecha.safetensors"):
        (folder / name).unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _parse_methods(text: str) -> dict[str, int]:
    """``{method: number of inputs}`` in the order given; unknown names are one clear error."""
    from ..errors import BadParameterError
    from ..methods import get_method

    methods: dict[str, int] = {}
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        spec = get_method(name)  # UnknownMethodError names the close matches
        if spec.min_models > 3:
            raise BadParameterError(f"--methods {name}: takes {spec.min_models} models; the benchmark has 3")
        # task-vector methods get a base and two task models, so their voting has something to do
        methods[name] = 3 if spec.variadic else max(2, spec.min_models)
    if not methods:
        raise BadParameterError("--methods: give at least one method, e.g. weighted_sum,add_difference")
    return methods


def _ours(inputs: list[Path], folder: Path, threads: str, method: str, n: int, mode: str) -> dict:
    return _run("ours", inputs[0], inputs[1], folder / "ours.safetensors", threads, mode, method,
                *map(str, inputs[2:n]))


def _mecha_available() -> str | None:
    """None when sd-mecha can be imported by a worker, else why not (the table says so)."""
    probe = subprocess.run([sys.executable, "-c", "import sd_mecha"], cwd=PACKAGE_PARENT,
                           capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return "not installed" if "No module named 'sd_mecha'" in probe.stderr else \
        f"not importable ({lines[-1] if lines else 'unknown error'})"


def _table(rows, floors, plain) -> str:
    head = (f"{'contender':<40} {'in':>2} {'seconds':>8} {'×durable':>8} {'×cache':>7} {'×plain':>7} "
            f"{'peak RSS':>9}  sd-mecha")
    lines = [head, "-" * len(head)]
    for n, (durable, cache) in sorted(floors.items()):
        for label, r in ((f"durable floor: read {n} + write 1 + fsync", durable),
                         (f"page-cache floor: read {n} + write 1", cache)):
            lines.append(f"{label:<40} {n:>2} {r['seconds']:>8.2f} {r['seconds'] / durable['seconds']:>8.2f} "
                         f"{r['seconds'] / cache['seconds']:>7.2f} {'':>7} {_gb(r['rss']):>9}")
    for label, n, ours, theirs, why_not in rows:
        durable, cache = floors[n]
        s = ours["seconds"]
        other = why_not if theirs is None else \
            f"{theirs['seconds']:.2f} s, {_gb(theirs['rss'])}; ours ÷ sd-mecha {s / theirs['seconds']:.2f}" + \
            (f" ({why_not})" if why_not else "")
        lines.append(f"{label:<40} {n:>2} {s:>8.2f} {s / durable['seconds']:>8.2f} {s / cache['seconds']:>7.2f} "
                     f"{s / plain['seconds']:>7.2f} {_gb(ours['rss']):>9}  {other}")
    return "\n".join(lines)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GB"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


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
    result["rss"] = peak_rss_of(result, usage)
    return result


def _worker(kind: str, a: Path, b: Path, out: Path, *extra: str) -> dict:
    """``warm``/``floor``/``floor-cache``: ``extra`` are more inputs; ``ours``: threads, durable
    or cache, the method, more inputs; ``mecha``: the method, more inputs."""
    if kind == "ours":  # imports are start-up, not merge time
        from ..engine import merge
        from ..recipe import Recipe
    elif kind == "baseline":
        from safetensors.torch import load_file, save_file
    elif kind == "mecha":
        import sd_mecha
        import torch
    started = time.perf_counter()
    result: dict = {}
    if kind in ("warm", "floor", "floor-cache"):
        buf = bytearray(16 * 1024 * 1024)
        for path in (a, b, *map(Path, extra)):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        if kind in ("floor", "floor-cache"):
            target = a.stat().st_size
            with open(out, "wb", buffering=0) as f:
                written = 0
                while written < target:
                    written += f.write(memoryview(buf)[: min(len(buf), target - written)])
                if kind == "floor":
                    os.fsync(f.fileno())
    elif kind == "ours":
        threads, mode, method, *more = extra
        merged = merge(Recipe(method, (str(a), str(b), *more), alpha=ALPHA if method in _ALPHA_METHODS else None), out,
                       threads=int(threads) or None, hash_inputs=False, durable=mode == "durable", overwrite=True)
        result["sha256"] = merged.sha256
    elif kind == "baseline":
        sa, sb = load_file(str(a)), load_file(str(b))
        merged = {}
        for key, ta in sa.items():
            if ta.is_floating_point():
                merged[key] = (ta.float() + ALPHA * (sb[key].float() - ta.float())).to(ta.dtype)
            else:
                merged[key] = ta
        save_file(merged, str(out))
        _fsync(out)  # same durability as the floor and ours
    elif kind == "mecha":
        method, *more = extra
        recipe = _mecha_recipe(sd_mecha, method, [sd_mecha.model(str(p)) for p in (a, b, *more)])
        sd_mecha.merge(recipe, output=str(out), output_dtype=torch.float16)
        _fsync(out)
    result["seconds"] = time.perf_counter() - started
    return result


def _mecha_recipe(sd_mecha, method: str, models: list):
    """sd-mecha 1.1's recipe for ``method`` with our defaults (base first for the task-vector ones)."""
    if method in ("weighted_sum", "slerp"):
        return getattr(sd_mecha, method)(*models, alpha=ALPHA)
    if method == "add_difference":
        return sd_mecha.add_difference(*models, alpha=ALPHA)
    if method == "train_difference":
        return sd_mecha.add_difference(*models, alpha=sd_mecha.train_difference_mask(*models, alpha=ALPHA))
    # their wrappers compare the unresolved merge space of a sub-recipe (AttributeError in 1.1.8), so the
    # task-vector recipes are spelled out: base + ties_sum…(B − base, C − base)
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    base, *tuned = models
    deltas = [sd_mecha.subtract(m, base) for m in tuned]
    if method == "ties":  # vote_sgn=True is the sum vote (our default) since sd-mecha 0.1
        return linear.add_difference(base, ties.ties_sum_extended(*deltas, k=0.2, vote_sgn=True), alpha=1.0)
    if method in ("dare", "della"):
        p, della_eps = (0.9, 0.0) if method == "dare" else (0.5, 0.2)
        res = ties.ties_sum_with_dropout(*deltas, probability=p, della_eps=della_eps, rescale=True, k=1.0,
                                         vote_sgn=True, seed=0)
        return linear.add_difference(base, res, alpha=1.0)
    if method == "geometric_median":  # ours includes the base as a point, so theirs gets all three models
        return sd_mecha.geometric_median(*models)
    raise ValueError(f"no sd-mecha counterpart for {method}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    kind, a, b, out, *rest = sys.argv[1:]
    print(worker_result(_worker(kind, Path(a), Path(b), Path(out), *rest)))
