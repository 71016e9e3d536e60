"""Put one stand-in host (``a1111`` or ``forge``) on sys.path for a test, and take it away again."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

from tests.standins.common import load_script_file

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("modules", "modules_forge", "backend", "networks", "xyz_grid", "xyz_grid.py", "merge_board.py")
REPO = os.path.dirname(os.path.dirname(ROOT))


def _purge() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
        del sys.modules[name]


@contextlib.contextmanager
def installed(host: str):
    path = os.path.join(ROOT, host)
    _purge()
    sys.path.insert(0, path)  # a1111/ also holds networks.py, the Lora built-in's module
    importlib.invalidate_caches()
    try:
        yield
    finally:
        try:
            if "networks" in sys.modules:
                sys.modules["networks"].uninstall()
        finally:
            while path in sys.path:
                sys.path.remove(path)
            _purge()
            importlib.invalidate_caches()


def load_entry_script():
    """Import scripts/merge_board.py as the WebUI does (module named after the file) and list its
    Script class in scripts_data."""
    return load_script_file(os.path.join(REPO, "scripts", "merge_board.py"), "MergeBoardLivePreview", REPO)


def load_xyz_grid():
    return load_script_file(os.path.join(ROOT, "xyz_grid.py"), "Script", ROOT)
