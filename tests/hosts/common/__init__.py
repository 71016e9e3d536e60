"""What both stand-in hosts share. Modules here are imported as they are (no host state);
``../shared_src/<name>.py`` is code both hosts ship alike that keeps module state, which each
host's module runs in its own namespace with ``exec_shared``. ``load_script_file`` loads a
``scripts/`` file into whichever host is installed (both features load their scripts with it)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def exec_shared(name: str, namespace: dict) -> None:
    """Run ``shared_src/<name>.py`` inside a host module's namespace: its ``from modules import``
    binds that host's modules and its globals are that module's, as with each host's own copy."""
    path = Path(__file__).resolve().parent.parent / "shared_src" / f"{name}.py"
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)


def load_script_file(path: str, script_class: str | None = None, basedir: str | None = None):
    """Import a ``scripts/*.py`` file as the WebUI does (modules/script_loading.load_module: the module
    is named after the file, e.g. ``"xyz_grid.py"``) and, given its Script class's name, list that
    class in the installed host's ``scripts.scripts_data``."""
    scripts = importlib.import_module("modules.scripts") if script_class else None
    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if scripts is not None:
        scripts.scripts_data.append(scripts.ScriptClassData(getattr(module, script_class), path, basedir, module))
    return module
