"""Which WebUI we run in. Forge is told apart by its package (``modules_forge``), never by the
model object (``forge_objects`` appears only after the first generation) nor by a version string."""
from __future__ import annotations

import importlib.util


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None
