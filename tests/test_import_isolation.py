"""``lib_merge`` (everything outside ``lib_merge.webui``) must import on a machine without gradio and
without a WebUI: the CLI, the demo and the benchmark run outside A1111/Forge."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = ("gradio", "modules")


class Blocker(importlib.abc.MetaPathFinder):
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            self.attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]

import lib_merge

imported, failures, skipped = [], {}, []


def excluded(name):
    # importing lib_merge.__main__ runs the CLI; its only import is lib_merge.cli
    return name == "lib_merge.webui" or name.startswith("lib_merge.webui.") or name == "lib_merge.__main__"


def walk(package):
    # pkgutil.walk_packages would import lib_merge.webui to look inside it: walk by hand instead
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        name = info.name
        if excluded(name):
            skipped.append(name)
            continue
        try:
            module = importlib.import_module(name)
            imported.append(name)
        except BaseException as exc:  # noqa: BLE001 - report every failure, not just the first
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        if info.ispkg:
            walk(module)


imported.append("lib_merge")
walk(lib_merge)

leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("lib_merge.webui"))
print(json.dumps({"imported": imported, "failures": failures, "skipped": skipped,
                  "attempts": Blocker.attempts, "leaked": leaked}))
'''


def run_isolated() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lib_merge_imports_without_gradio_or_webui():
    result = run_isolated()
    assert result["failures"] == {}, result["failures"]
    assert result["leaked"] == []
    imported = set(result["imported"])
    for required in (
        "lib_merge", "lib_merge.cli", "lib_merge.engine", "lib_merge.plan", "lib_merge.recipe",
        "lib_merge.metadata", "lib_merge.inputs", "lib_merge.inspect", "lib_merge.synthetic", "lib_merge.blocks",
        "lib_merge.presets", "lib_merge.io.reader", "lib_merge.io.writer", "lib_merge.io.safe_pickle",
        "lib_merge.io.hashing", "lib_merge.io.dtypes", "lib_merge.methods.registry", "lib_merge.methods.basic",
        "lib_merge.methods.spherical", "lib_merge.methods.difference", "lib_merge.arch.detect",
        "lib_merge.arch.keys", "lib_merge.arch.layouts", "lib_merge.testing",
    ):
        assert required in imported or required == "lib_merge", required
    assert not any(name.startswith("lib_merge.webui") for name in imported)


def test_the_blocker_really_blocks():
    """Guard against a vacuous pass: with the same finder, importing gradio or a WebUI module fails."""
    probe = SCRIPT.split("import lib_merge", 1)[0] + (
        "ok = []\n"
        "for name in ('gradio', 'modules.shared', 'modules'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        ok.append(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(json.dumps(ok))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
