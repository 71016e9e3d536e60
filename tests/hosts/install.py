"""Install one stand-in host's top-level packages for the duration of a test, and load scripts into
it the way the WebUI does."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

from tests.hosts.common import load_script_file

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(ROOT))
# The hosts' packages, the Lora built-in's module (a1111/networks.py) and the scripts loaded by file name.
HOST_PACKAGES = ("modules", "k_diffusion", "backend", "modules_forge", "networks", "xyz_grid", "untitled_guidance", "merge_board")


def _purge(fake_gradio: bool) -> None:
    # Host modules re-exported from the a1111 stand-ins bind the current host's globals: purge them too.
    roots = HOST_PACKAGES + (("gradio",) if fake_gradio else ())
    for name in [n for n in sys.modules if n.split(".")[0] in roots or n.startswith(("tests.hosts.a1111", "tests.hosts.forge"))]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _forget_adapter_state() -> None:
    # The adapters cache untitled conds per model object and Forge patch cells; a new host is a new world.
    for name in ("lib_merge.webui.guidance.untitled_conds", "lib_merge.webui.guidance.console", "lib_merge.webui.guidance.forge"):
        mod = sys.modules.get(name)
        if mod is not None:
            getattr(mod, "_COND_CACHE", {}).clear()
            getattr(mod, "_CELLS", {}).clear()
            getattr(mod, "_logged", set()).clear()


@contextlib.contextmanager
def installed(host: str, *, fake_gradio: bool = False):
    """``host``'s packages first on sys.path; with ``fake_gradio`` the recording gradio of
    gradio_fake/ too (the guidance UI tests read what it recorded; the board builds on the real one)."""
    paths = [os.path.join(ROOT, host)] + ([os.path.join(ROOT, "gradio_fake")] if fake_gradio else [])
    _purge(fake_gradio)
    for path in reversed(paths):
        sys.path.insert(0, path)
    _forget_adapter_state()
    # The stand-in U-Nets are tiny: one thread avoids paying for thread wake-ups on every small op.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        try:
            if "networks" in sys.modules:
                sys.modules["networks"].uninstall()
        finally:
            for path in paths:
                while path in sys.path:
                    sys.path.remove(path)
            _purge(fake_gradio)
            _forget_adapter_state()


def load_script():
    """Import scripts/untitled_guidance.py the way the WebUI does (module named after the file)."""
    return load_script_file(os.path.join(REPO, "scripts", "untitled_guidance.py"))


def guidance_runner(host: str):
    """Inside ``installed(host)``: a tiny SD1 model as ``shared.sd_model`` and a ``ScriptRunner``
    holding the Untitled Guidance script as the WebUI sets it up. Returns (runner, script, module)."""
    from modules import scripts, shared

    from tests.hosts.common.models import A1111Model, ForgeEngine

    from lib_merge.webui.guidance.controls import CONTROLS

    shared.sd_model = ForgeEngine("sd1") if host == "forge" else A1111Model("sd1")
    module = load_script()
    script = module.UntitledGuidanceScript()
    script.filename = "untitled_guidance.py"
    runner = scripts.ScriptRunner()
    runner.add(script, len(CONTROLS))
    return runner, script, module


def load_entry_script():
    """Import scripts/merge_board.py as the WebUI does and list its Script class in scripts_data."""
    return load_script_file(os.path.join(REPO, "scripts", "merge_board.py"), "MergeBoardLivePreview", REPO)


def load_xyz_grid():
    """Load the X/Y/Z stand-in as the WebUI loads scripts/xyz_grid.py and list it in scripts_data."""
    return load_script_file(os.path.join(ROOT, "common", "xyz_grid.py"), "Script", ROOT)
