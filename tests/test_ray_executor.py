"""The Ray executor (``--executor ray``): a merge or a soup export run as Ray tasks writes the
byte-identical file of a local run; a worker killed mid-merge is retried and a killed driver is
resumed to the same file; a node that cannot see an input fails with one clear error; without
Ray, ``--executor ray`` is one ``error:`` line and nothing imports Ray unless asked.

One local Ray instance (loopback, 2 CPUs, an 80 MB object store, no dashboard) serves the whole
module. The tests that need it are marked ``ray``: ``pytest -m "not ray"`` skips them, and they
skip themselves where Ray is not installed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lib_merge import engine
from lib_merge.engine.executor import ExecutorError
from lib_merge.errors import MergeCancelled
from lib_merge.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
SHARD = 256 << 10  # the synthetic SD1 checkpoints are ~2.3 MB: several shards per merge
needs_ray = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install \".[ray]\")")
    ray.init(num_cpus=2, object_store_memory=80 << 20, _memory=2 << 30, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_executor():
    from lib_merge.engine.ray_executor import RayExecutor

    return RayExecutor(shard_bytes=SHARD)


CASES = {
    "weighted_sum": ("sd1_a", "sd1_b"),
    "add_difference": ("sd1_a", "sd1_b", "sd1_c"),
    "ties": ("sd1_a", "sd1_b", "sd1_c"),
    "dare": ("sd1_a", "sd1_b", "sd1_c"),
    "geometric_median": ("sd1_a", "sd1_b", "sd1_c"),
}


@needs_ray
@pytest.mark.parametrize("method", list(CASES))
def test_ray_merge_is_the_local_file_byte_for_byte(method, ray_address, models, out_dir):
    recipe = Recipe(method, tuple(str(getattr(models, m)) for m in CASES[method]), alpha=0.4, seed=7)
    local = engine.merge(recipe, out_dir / "local.safetensors")
    executor, seen = ray_executor(), []
    remote = engine.merge(recipe, out_dir / "ray.safetensors", executor=executor,
                          progress=lambda done, total, key: seen.append((done, total)))
    assert (out_dir / "ray.safetensors").read_bytes() == (out_dir / "local.safetensors").read_bytes()
    assert remote.sha256 == local.sha256
    assert executor.stats.shards >= 3 and len(executor.stats.task_seconds) == executor.stats.shards
    assert os.getpid() not in {int(who.split(":")[1]) for who in executor.stats.peak_rss}  # ran in Ray workers
    # progress on the driver, fed by returned shards: monotonic, ending at the whole output
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1] == local.bytes_written
    assert remote.bytes_read == local.bytes_read
    assert sorted(p.name for p in out_dir.iterdir()) == ["local.safetensors", "ray.safetensors"]


@needs_ray
def test_soup_export_on_ray_is_the_local_file(ray_address, models, out_dir, tmp_path):
    from lib_merge.soup import Pot

    pot = Pot.init(tmp_path / "pot")
    pot.add([str(models.sd1_a), str(models.sd1_b), str(models.sd1_c)])
    _, local = pot.export(out_dir / "local.safetensors")
    _, remote = pot.export(out_dir / "ray.safetensors", executor=ray_executor())
    assert (out_dir / "ray.safetensors").read_bytes() == (out_dir / "local.safetensors").read_bytes()
    assert remote == local


def _shard_workers() -> list[int]:
    """PIDs of Ray worker processes running a shard right now (Ray titles them by the task)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::lib_merge-shard"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


@needs_ray
def test_a_worker_killed_mid_merge_is_retried_to_the_identical_file(ray_address, models, out_dir):
    recipe = Recipe("geometric_median", (str(models.sd1_a), str(models.sd1_b), str(models.sd1_c)), seed=3)
    local = engine.merge(recipe, out_dir / "local.safetensors")
    final = out_dir / "ray.safetensors"
    killed: list[tuple[int, bool]] = []
    finished = threading.Event()

    def assassin() -> None:  # the first worker seen running a shard is killed by its PID
        while not finished.is_set() and not killed:
            for pid in _shard_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, final.exists()))
                break
            time.sleep(0.002)

    thread = threading.Thread(target=assassin)
    thread.start()
    try:
        result = engine.merge(recipe, final, executor=ray_executor())
    finally:
        finished.set()
        thread.join()
    assert killed, "no shard was seen running: nothing was killed"
    assert killed[0][1] is False  # while the merge ran there was no file under the final name
    assert final.read_bytes() == (out_dir / "local.safetensors").read_bytes()
    assert result.sha256 == local.sha256


DRIVER = textwrap.dedent("""
    import os, signal, sys
    import ray
    from lib_merge import engine
    from lib_merge.engine.ray_executor import RayExecutor
    from lib_merge.recipe import Recipe

    address, out, shard, *models = sys.argv[1:]
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    journal = out + ".resume"

    def progress(done, total, key):  # once a shard is journaled, the driver dies (SIGKILL: no cleanup)
        with open(journal) as f:
            if len(f.readlines()) > 1:
                os.kill(os.getpid(), signal.SIGKILL)

    engine.merge(Recipe("ties", tuple(models), seed=5), out, journal=True, progress=progress,
                 executor=RayExecutor(shard_bytes=int(shard)))
    print("finished without being killed")
""")


@needs_ray
def test_a_killed_driver_is_resumed_to_the_identical_file(ray_address, models, out_dir):
    from lib_merge.cli import main

    paths = [str(models.sd1_a), str(models.sd1_b), str(models.sd1_c)]
    local = engine.merge(Recipe("ties", tuple(paths), seed=5), out_dir / "local.safetensors")
    out = out_dir / "ray.safetensors"
    # Ray would turn 127.0.0.1 into this machine's network address when joining; stay on loopback
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, ray_address, str(out), str(SHARD), *paths], cwd=ROOT,
                          capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not out.exists()
    lines = (out_dir / "ray.safetensors.resume").read_text().splitlines()
    kept = {k for line in lines[1:] for k in json.loads(line)["done"]}
    assert kept and (out_dir / "ray.safetensors.tmp").exists()
    assert main(["merge", "--resume", "-o", str(out), "--executor", "ray", "--shard-size", "1M"]) == 0
    assert out.read_bytes() == (out_dir / "local.safetensors").read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["local.safetensors", "ray.safetensors"]
    assert local.sha256


@needs_ray
def test_a_cancelled_ray_merge_resumes_locally_to_the_identical_file(ray_address, models, out_dir):
    recipe = Recipe("dare", (str(models.sd1_a), str(models.sd1_b), str(models.sd1_c)), seed=11)
    engine.merge(recipe, out_dir / "local.safetensors")
    out = out_dir / "ray.safetensors"
    cancel = threading.Event()
    with pytest.raises(MergeCancelled, match="--resume"):
        engine.merge(recipe, out, journal=True, cancel=cancel, executor=ray_executor(),
                     progress=lambda done, total, key: cancel.set())
    assert not out.exists() and (out_dir / "ray.safetensors.tmp").exists()
    result = engine.merge(recipe, out, resume=True)  # the local executor finishes it
    assert result.resumed_keys > 0
    assert out.read_bytes() == (out_dir / "local.safetensors").read_bytes()


@needs_ray
def test_an_input_a_node_cannot_see_is_one_clear_error(ray_address, models, out_dir):
    b = models.sd1_b
    recipe = Recipe("weighted_sum", (str(models.sd1_a), str(b)), alpha=0.5)
    hidden = b.with_name("elsewhere.safetensors")

    def hide_b(plan_text: str) -> None:  # the driver has planned from B; the workers will not find it
        b.rename(hidden)

    with pytest.raises(ExecutorError) as caught:
        engine.merge(recipe, out_dir / "out.safetensors", executor=ray_executor(), on_plan=hide_b,
                     hash_inputs=False)
    message = str(caught.value)
    assert "\n" not in message and str(b) in message and "every node must see the inputs" in message
    assert list(out_dir.iterdir()) == []  # no output, no partial file


@needs_ray
def test_workers_take_the_drivers_cosine_prepass(ray_address, models, out_dir):
    """The driver hands its whole-model pre-pass result to the workers instead of each reading
    both models again. Seen through a range the files would not give, remembered on the driver:
    the workers' plans (whose layout digest holds every key's parameters) match the driver's only
    if they took it, and the file is the local merge with that range."""
    from lib_merge.engine.executor import open_plan
    from lib_merge.methods import get_method, prepass_cache

    recipe = Recipe("cosine_b", (str(models.sd1_a), str(models.sd1_b)), alpha=0.2)
    prepass_cache.CACHE.clear()
    with open_plan(recipe) as plan:
        key = get_method("cosine_b").fn.prepass.cache_key(plan)
        true_range = next(j.params["sims_range"] for j in plan.jobs if j.action == "merge")
    assert key is not None
    prepass_cache.CACHE.put(key, {"sims_range": (true_range[0] + 0.1, true_range[1])})
    local = engine.merge(recipe, out_dir / "local.safetensors", hash_inputs=False)
    remote = engine.merge(recipe, out_dir / "ray.safetensors", executor=ray_executor(), hash_inputs=False)
    assert remote.sha256 == local.sha256
    prepass_cache.CACHE.clear()
    assert engine.merge(recipe, out_dir / "true.safetensors", hash_inputs=False).sha256 != local.sha256


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where ``import ray`` fails as on a machine without it."""
    prelude = "import sys\nsys.modules['ray'] = None  # import ray → ImportError\n"
    env = {**os.environ, "LIB_MERGE_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_executor_ray_without_ray_is_one_error_line(models, out_dir, tmp_path):
    out = out_dir / "out.safetensors"
    code = f"from lib_merge.cli import main\nsys.exit(main(['merge', {str(models.sd1_a)!r}, {str(models.sd1_b)!r}, " \
           f"'-o', {str(out)!r}, '--executor', 'ray']))"
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --executor ray needs Ray")
    assert 'pip install "ray[default]"' in lines[0]
    assert list(out_dir.iterdir()) == []


def test_lib_merge_and_a_local_merge_never_import_ray(models, out_dir, tmp_path):
    out = out_dir / "out.safetensors"
    code = textwrap.dedent(f"""
        del sys.modules['ray']  # importable again: the test is that nothing asks for it
        import lib_merge, lib_merge.engine, lib_merge.cli, lib_merge.soup.cli, lib_merge.webui
        from lib_merge.cli import main
        assert main(['merge', {str(models.sd1_a)!r}, {str(models.sd1_b)!r}, '-o', {str(out)!r}]) == 0
        print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))
    """)
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert out.exists()
