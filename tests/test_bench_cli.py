"""One entry for every benchmark (``lib-merge bench {merge,many,live,guidance}``), earlier
spellings kept, and runnable from any folder."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lib_merge.bench.cli import bench_argv
from lib_merge.cli import build_parser


@pytest.mark.parametrize("argv, expected", [
    (["bench"], ["bench", "merge"]),
    (["bench", "--arch", "sdxl"], ["bench", "merge", "--arch", "sdxl"]),
    (["bench", "--many", "4,8", "--keep"], ["bench", "many", "4,8", "--keep"]),
    (["bench", "--dir", "x", "--many=4"], ["bench", "many", "4", "--dir", "x"]),
    (["bench", "many", "4"], ["bench", "many", "4"]),
    (["merge", "a", "b"], ["merge", "a", "b"]),
])
def test_earlier_spellings_map_to_the_sub_commands(argv, expected):
    assert bench_argv(argv) == expected


def test_parsed_options_reach_each_benchmark():
    args = build_parser().parse_args(bench_argv(["bench", "--many", "4,8", "--max-memory", "2G", "--dir", "d"]))
    assert (args.bench, args.many, args.max_memory, args.dir) == ("many", "4,8", "2G", "d")
    args = build_parser().parse_args(bench_argv(["bench", "--arch", "sdxl", "--skip-baseline"]))
    assert (args.bench, args.arch, args.skip_baseline, args.dir) == ("merge", "sdxl", True, "bench_tmp")


def test_guidance_benchmark_runs_from_another_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lib_merge", "bench", "guidance", "--sizes", "8x8", "--steps", "1", "--repeats", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("PAG", "SEG", "CFG++", "FreeU"):
        assert method in proc.stdout


def test_lora_benchmark_runs_end_to_end_on_small_files(tmp_path):
    """The smallest configuration of `bench lora` (widths ÷ 32, rank 4) from another folder: every
    contender reports, the randomized extraction is within a few percent of the optimal error,
    and the scratch folder is removed."""
    args = build_parser().parse_args(["bench", "lora", "--scale", "32", "--rank", "4", "--dir", "d"])
    assert (args.bench, args.arch, args.scale, args.rank, args.dir) == ("lora", "sd1", 32, 4, "d")
    proc = subprocess.run(
        [sys.executable, "-m", "lib_merge", "bench", "lora", "--scale", "32", "--rank", "4", "--dir", "scratch"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in ("(a) I/O floor", "(b) bake", "(b2) weighted_sum A B --lora L", "full SVD", "randomized SVD"):
        assert label in out, out
    assert "load average" in out and "targets: bake/a ≤ 1.5" in out
    full, randomized = (float(re.search(rf"extract, {kind} SVD: \d+ modules; relative error \S+ ([0-9.]+)", out).group(1))
                        for kind in ("full", "randomized"))
    assert 0 < full < 1 and full <= randomized * (1 + 1e-6) and randomized <= 1.05 * full
    assert not (tmp_path / "scratch").exists()


def _ratio_of_printed(ratio: float, seconds: float, reference: float) -> bool:
    """Whether ``ratio`` (printed to 2 decimals) can be seconds ÷ reference, both also printed to 2
    decimals: at this size a floor is a few hundredths of a second, so the rounding of the printed
    values alone moves the quotient by tens of percent."""
    half = 0.005
    low = (seconds - half) / (reference + half)
    high = (seconds + half) / max(reference - half, 1e-9)
    return low - half <= ratio <= high + half


def test_merge_benchmark_runs_its_smallest_configuration_end_to_end(tmp_path):
    """`bench merge` on files with widths ÷ 32, from another folder, a 2-input, a 3-input and a
    task-vector method: one table with both floors for each input count and a row per method,
    every ratio consistent with the seconds, sd-mecha's column filled or saying why not, the
    scratch folder removed; an unknown method is one error line before any file is made."""
    args = build_parser().parse_args(bench_argv(["bench", "merge", "--methods", "a,b", "--scale", "32"]))
    assert (args.bench, args.methods, args.scale) == ("merge", "a,b", 32)
    cmd = [sys.executable, "-m", "lib_merge", "bench", "merge", "--scale", "32", "--skip-baseline", "--dir", "scratch"]
    # weighted_sum is not asked for: its row is still there, since every × plain refers to it
    proc = subprocess.run([*cmd, "--methods", "add_difference,ties"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "load average" in out and "targets: weighted_sum ≤ 1.3 × durable floor" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\S.*?)\s{2,}([23])\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]*)\s*([0-9.]+) GB(.*)", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), *(float(v) if v else None for v in m.groups()[2:6]), m.group(8))
    for n in (2, 3):
        durable = rows[f"durable floor: read {n} + write 1 + fsync"]
        cache = rows[f"page-cache floor: read {n} + write 1"]
        assert durable[2] == 1.0 and cache[3] == 1.0
    plain = rows["weighted_sum"]
    assert plain[0] == 2 and plain[4] == 1.0
    for method, n in (("add_difference", 3), ("ties", 3), ("weighted_sum, no fsync", 2)):
        inputs, seconds, x_durable, x_cache, x_plain, mecha = rows[method]
        assert inputs == n and seconds > 0
        floor = rows[f"durable floor: read {n} + write 1 + fsync"][1]
        assert _ratio_of_printed(x_durable, seconds, floor)
        assert _ratio_of_printed(x_plain, seconds, plain[1])
    try:
        import sd_mecha  # noqa: F401
        assert "ours ÷ sd-mecha" in rows["add_difference"][5] and "ours ÷ sd-mecha" in rows["ties"][5]
        assert rows["weighted_sum"][5].strip() == "not in --methods"
    except ImportError:
        assert rows["weighted_sum"][5].strip() == rows["ties"][5].strip() == "not installed"
    assert not (tmp_path / "scratch").exists()

    bad = subprocess.run([*cmd, "--methods", "weighted_sum,wieghted"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.startswith("error: unknown merge method 'wieghted'")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "scratch").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_worker_reports_its_own_peak_not_the_benchmark_process_size(tmp_path):
    """wait4's ru_maxrss of an exec'd child includes the parent's high-water mark: a floor worker
    (no torch, 16 MiB buffer) started from a process holding 600 MB must still report its own."""
    from lib_merge.bench.merge import _run

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touched: resident
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"\0" * 2**20)
    b.write_bytes(b"\0" * 2**20)
    result = _run("floor", a, b, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").stat().st_size == 2**20
    assert 0 < result["rss"] < 200 * 2**20, result["rss"]
    del ballast
