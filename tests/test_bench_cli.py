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
    full, randomized = (float(v) for v in re.search(r"full ([0-9.]+), randomized ([0-9.]+)", out).groups())
    assert 0 < full < 1 and full <= randomized * (1 + 1e-6) and randomized <= 1.05 * full
    assert not (tmp_path / "scratch").exists()
