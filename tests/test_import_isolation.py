"""Every module of ``lib_merge`` imports on a machine without gradio and without a WebUI: the core
(the CLI, the demo, the benchmarks run outside A1111/Forge) never touches ``lib_merge.webui``, and
the WebUI glue imports gradio and the host's packages only inside functions, so its adapters load
anywhere and pick the host at run time. One subprocess walks the whole package with those imports
blocked."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = ("gradio", "modules", "modules_forge", "backend", "k_diffusion", "ldm", "sgm")


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
    return name == "lib_merge.__main__"


def webui_modules():
    return sorted(m for m in sys.modules if m.startswith("lib_merge.webui"))


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
# the core first, alone: nothing of it may pull in the WebUI glue
core = [info for info in pkgutil.iter_modules(lib_merge.__path__, "lib_merge.") if info.name != "lib_merge.webui"]
for info in core:
    if excluded(info.name):
        skipped.append(info.name)
        continue
    try:
        module = importlib.import_module(info.name)
        imported.append(info.name)
    except BaseException as exc:  # noqa: BLE001
        failures[info.name] = f"{type(exc).__name__}: {exc}"
        continue
    if info.ispkg:
        walk(module)
core_leaked_webui = webui_modules()
import lib_merge.webui
imported.append("lib_merge.webui")
walk(lib_merge.webui)

from lib_merge.webui.guidance import a1111, host_adapter

# host detection asks importlib.util.find_spec, which must answer "absent", not raise: these two
# are not installed here, so letting the finder pass them on is that answer
BLOCKED = tuple(b for b in BLOCKED if b not in ("modules_forge", "backend"))
adapter = host_adapter().__name__
registered = a1111.register_samplers()
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"imported": imported, "failures": failures, "skipped": skipped,
                  "attempts": Blocker.attempts, "leaked": leaked, "core_leaked_webui": core_leaked_webui,
                  "adapter": adapter, "registered": registered}))
'''


@functools.lru_cache(maxsize=1)
def run_isolated() -> tuple:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def test_every_module_imports_without_gradio_or_a_webui():
    result, stdout = run_isolated()
    assert result["failures"] == {}, result["failures"]
    assert result["leaked"] == []
    assert result["core_leaked_webui"] == []
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
    for required in ("lib_merge.webui.board.ui", "lib_merge.webui.board.host_a1111", "lib_merge.webui.board.host_forge",
                     "lib_merge.webui.board.standalone", "lib_merge.webui.guidance.a1111", "lib_merge.webui.guidance.forge",
                     "lib_merge.webui.guidance.ui", "lib_merge.webui.guidance.paste", "lib_merge.webui.hosts.detect",
                     "lib_merge.webui.hosts.xyz"):
        assert required in imported, required


def test_webui_adapters_pick_the_host_at_run_time():
    """Without ``modules_forge`` the guidance adapter is A1111's; outside a WebUI our samplers are not
    registered, and it says so instead of failing."""
    result, stdout = run_isolated()
    assert result["adapter"] == "lib_merge.webui.guidance.a1111"
    assert result["registered"] == []
    assert "CFG++ samplers not registered" in stdout


def test_the_blocker_really_blocks():
    """Guard against a vacuous pass: with the same finder, importing gradio or a WebUI module fails."""
    probe = SCRIPT.split("\nimport lib_merge\n", 1)[0] + (
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
