"""lib_merge: streaming, per-block merging of Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL).

The core imports only the standard library, torch and numpy; everything that touches a WebUI or
gradio lives in ``lib_merge.webui``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import MergeError  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402

__all__ = ["MergeError", "Recipe", "load_recipe", "merge", "__version__"]


def merge(recipe, output, **kwargs):
    """Run a merge recipe into ``output``; see :func:`lib_merge.engine.merge`."""
    from .engine import merge as _merge

    return _merge(recipe, output, **kwargs)
