"""Install one stand-in host's top-level packages for the duration of a test."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

from tests.standins.common import load_script_file

ROOT = os.path.dirname(os.path.abspath(__file__))
HOST_PACKAGES = ("modules", "k_diffusion", "backend", "modules_forge", "gradio", "untitled_guidance", "xyz_grid")


def _ours(name: str) -> bool:
    # Host modules re-exported from the a1111 stand-ins bind the current host's globals: purge them too.
    return name.split(".")[0] in HOST_PACKAGES or name.startswith(("tests.standins.a1111", "tests.standins.forge"))


def _forget_adapter_state() -> None:
    # The adapters cache untitled conds per model object and Forge patch cells; a new host is a new world.
    for name in ("lib_merge.webui.guidance.untitled_conds", "lib_merge.webui.guidance.console", "lib_merge.webui.guidance.forge"):
        mod = sys.modules.get(name)
        if mod is not None:
            getattr(mod, "_COND_CACHE", {}).clear()
            getattr(mod, "_CELLS", {}).clear()
            getattr(mod, "_logged", set()).clear()


def load_script():
    """Import scripts/untitled_guidance.py the way the WebUI does (module named after the file)."""
    return load_script_file(os.path.join(os.path.dirname(os.path.dirname(ROOT)), "scripts", "untitled_guidance.py"))


@contextlib.contextmanager
def installed(host: str):
    path = os.path.join(ROOT, host)
    fake_gradio = os.path.join(ROOT, "gradio_fake")
    for name in [n for n in sys.modules if _ours(n)]:
        del sys.modules[name]
    sys.path.insert(0, fake_gradio)
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    _forget_adapter_state()
    # The stand-in U-Nets are tiny: one thread avoids paying for thread wake-ups on every small op.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(path)
        sys.path.remove(fake_gradio)
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        importlib.invalidate_caches()
        _forget_adapter_state()


def load_xyz_grid():
    """Load the X/Y/Z stand-in as the WebUI loads scripts/xyz_grid.py and list it in scripts_data."""
    return load_script_file(os.path.join(ROOT, "common", "xyz_grid.py"), "Script", ROOT)
