"""The inspector's A-vs-B sums (the board's "Compare A and B"): right numbers, and memory that does
not grow with the tensor (fresh fp64 copies of every tensor made a 2 GB pair take a minute)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_merge.inspect import COMPARE_CHUNK, BlockStats, _accumulate

ROOT = Path(__file__).resolve().parents[1]


def _pair(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * 0.02
    b = a + torch.randn(n, generator=g) * 0.002
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sums_match_an_fp64_reference_across_several_slices(dtype):
    a, b = _pair(5 * (2 * COMPARE_CHUNK // 5 + 12345), dtype)  # 2+ slices, a multiple of 5
    stats = BlockStats()
    _accumulate(stats, a.view(-1, 5), b.view(-1, 5))  # any shape: flattened
    xa, xb = a.double(), b.double()
    assert stats.sq_a == pytest.approx(float(xa @ xa), rel=1e-6)
    assert stats.sq_b == pytest.approx(float(xb @ xb), rel=1e-6)
    assert stats.dot == pytest.approx(float(xa @ xb), rel=1e-6)
    assert stats.sq_diff == pytest.approx(float((xb - xa) @ (xb - xa)), rel=1e-6)
    assert stats.relative_difference == pytest.approx(float((xb - xa).norm() / xa.norm()), rel=1e-6)


def test_identical_tensors_give_exactly_zero_difference():
    a, _ = _pair(COMPARE_CHUNK + 7, torch.float16)
    stats = BlockStats()
    _accumulate(stats, a, a.clone())
    assert stats.sq_diff == 0.0 and stats.relative_difference == 0.0
    assert stats.cosine == pytest.approx(1.0, abs=1e-6)


_PEAK_SCRIPT = r"""
import resource, torch
from lib_merge.inspect import BlockStats, _accumulate
n = 48 << 20
a = torch.randn(n).mul_(0.02).half()
b = torch.randn(n).mul_(0.02).half()
_accumulate(BlockStats(), a[:4096], b[:4096])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_accumulate(BlockStats(), a, b)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_comparing_a_big_tensor_needs_no_copy_of_it():
    # 48 M elements (96 MB in fp16): three fp64 copies would add ~1.1 GB to the peak; the slice
    # buffers add 8 MB. Run in a fresh process so the high-water mark is this comparison's alone.
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb = int(done.stdout.strip().splitlines()[-1])
    assert grown_mb < 64, f"peak memory grew {grown_mb} MB while comparing a 96 MB pair"


def test_compare_runs_on_one_torch_thread_and_leaves_the_callers_setting(tmp_path):
    # On a busy 2-core machine every op split over torch's two threads waits for the descheduled
    # one (the real A1111's Compare: 78 s with 2 threads, 4.9 s with 1); the host's own setting,
    # and what threads started later inherit, must stay as they were.
    import threading

    from lib_merge.inspect import inspect_models
    from tests.hosts.common.checkpoints import write_checkpoint

    a, b = (write_checkpoint(tmp_path / f"m{i}.safetensors", "sd1", seed=i) for i in range(2))
    seen = set()
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run single-threaded; a WebUI does not
    try:
        result = inspect_models(str(a), str(b), progress=lambda n, total: seen.add(torch.get_num_threads()))
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == {1}
        assert torch.get_num_threads() == 2 and fresh == [2]
    finally:
        torch.set_num_threads(original)
    compared = [stats for stats in result.blocks.values() if stats.sq_a > 0]
    assert compared and all(stats.relative_difference > 0 for stats in compared)


def test_compare_errors_reach_the_caller(tmp_path):
    from lib_merge.errors import MergeError
    from lib_merge.inspect import inspect_models

    with pytest.raises(MergeError):
        inspect_models(str(tmp_path / "missing.safetensors"))
