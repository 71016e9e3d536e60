"""Resume files: a merge stopped by a failure, a cancel or a hard kill continues with
`merge --resume` and gives bit for bit the file of an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import lib_merge.engine as engine
import lib_merge.engine.run as engine_run
import lib_merge.resume as resume
from lib_merge.cli import main
from lib_merge.errors import MergeCancelled, ResumeError
from lib_merge.io.writer import temp_path_for
from lib_merge.recipe import Recipe
from lib_merge.resume import journal_path

from _slim import write_slim_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("resume")
    return [str(write_slim_unet(folder / f"m{i}.safetensors", model=i, family=6)) for i in range(4)]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    engine.merge(Recipe("dgmla", tuple(models), seed=5), out, hash_inputs=False, threads=1)
    return out.read_bytes()


@pytest.fixture(autouse=True)
def flush_often(monkeypatch):
    monkeypatch.setattr(resume, "FLUSH_SECONDS", 0.0)


def fail_after(monkeypatch, count: int, error: BaseException) -> None:
    produce = engine_run.produce_job
    calls = {"n": 0}
    lock = threading.Lock()

    def failing(plan, job, counters=None):
        with lock:
            calls["n"] += 1
            hit = calls["n"] == count
        if hit:
            raise error
        yield from produce(plan, job, counters)

    monkeypatch.setattr(engine_run, "produce_job", failing)


def test_failure_mid_merge_then_resume_equals_uninterrupted(models, reference, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    recipe = Recipe("dgmla", tuple(models), seed=5)
    fail_after(monkeypatch, 30, OSError("injected disk failure"))
    with pytest.raises(OSError, match="injected"):
        engine.merge(recipe, out, hash_inputs=False, threads=2, journal=True)
    assert not out.exists() and temp_path_for(out).exists() and journal_path(out).exists()
    monkeypatch.undo()
    with pytest.raises(ResumeError, match="--resume"):  # a plain re-run must not throw the progress away
        engine.merge(recipe, out, hash_inputs=False)
    result = engine.merge(recipe, out, hash_inputs=False, threads=3, resume=True)
    assert 0 < result.resumed_keys < 65
    assert out.read_bytes() == reference
    assert not temp_path_for(out).exists() and not journal_path(out).exists()


def test_cancel_then_cli_resume_from_the_resume_file_alone(models, reference, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    cancel = threading.Event()

    def progress(done, total, key):
        if done > total // 3:
            cancel.set()

    with pytest.raises(MergeCancelled, match="--resume"):
        engine.merge(Recipe("dgmla", tuple(models), seed=5), out, hash_inputs=False, threads=2, journal=True,
                     cancel=cancel, progress=progress)
    assert main(["merge", "--resume", "-o", str(out), "--no-hash"]) == 0
    assert "resumed:" in capsys.readouterr().out
    assert out.read_bytes() == reference


def test_hard_kill_then_resume(models, reference, tmp_path):
    """The process dies (os._exit, no cleanup) after some keys: the resume file lists only keys
    whose bytes were fsynced, so resuming still gives the exact file."""
    out = tmp_path / "out.safetensors"
    script = textwrap.dedent(f"""
        import os, threading
        import lib_merge.engine.run as engine, lib_merge.resume as resume  # run: where execute looks produce_job up
        from lib_merge.recipe import Recipe
        resume.FLUSH_SECONDS = 0.0
        produce, lock, seen = engine.produce_job, threading.Lock(), [0]
        def dying(plan, job, counters=None):
            with lock:
                seen[0] += 1
                if seen[0] == 40:
                    os._exit(9)
            yield from produce(plan, job, counters)
        engine.produce_job = dying
        engine.merge(Recipe("dgmla", tuple({models!r}), seed=5), {str(out)!r}, hash_inputs=False, threads=2, journal=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    lines = journal_path(out).read_text().splitlines()
    recorded = sum(len(json.loads(line)["done"]) for line in lines[1:])
    assert 0 < recorded < 40
    engine.merge(Recipe("dgmla", tuple(models), seed=5), out, hash_inputs=False, resume=True)
    assert out.read_bytes() == reference


def test_resume_refuses_another_plan_and_keeps_the_progress(models, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    fail_after(monkeypatch, 20, OSError("boom"))
    with pytest.raises(OSError):
        engine.merge(Recipe("dgmla", tuple(models), seed=5), out, hash_inputs=False, journal=True)
    monkeypatch.undo()
    partial = temp_path_for(out).read_bytes()
    with pytest.raises(ResumeError, match="another recipe"):
        engine.merge(Recipe("dgmla", tuple(models), seed=6), out, hash_inputs=False, resume=True)
    assert temp_path_for(out).read_bytes() == partial
    with pytest.raises(ResumeError, match="nothing to resume"):
        engine.merge(Recipe("dgmla", tuple(models), seed=5), tmp_path / "other.safetensors", hash_inputs=False,
                     resume=True)
    # --overwrite starts over
    engine.merge(Recipe("dgmla", tuple(models), seed=6), out, hash_inputs=False, overwrite=True)
    assert out.exists() and not journal_path(out).exists()


def test_small_merges_write_no_resume_file_by_default(models, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    fail_after(monkeypatch, 5, OSError("boom"))
    with pytest.raises(OSError):
        engine.merge(Recipe("ties_soup", tuple(models)), out, hash_inputs=False)
    assert not temp_path_for(out).exists() and not journal_path(out).exists()
