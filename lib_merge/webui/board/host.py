"""The Host protocol the Merge Board is built against, and the facts about checkpoints the board
and its X/Y/Z axes share (architecture from the header, output names confined to a folder). The
live-preview session over a host is in ``live_session``.

A host (A1111, Forge, the standalone folder host) answers: which checkpoints exist, which one is
loaded, how to reach the loaded model's weights (a ``LiveTarget``), which lock serialises weight
mutation against generation, where merged files go, and how to generate a preview image. The
board never imports ``modules``; the host adapters do, lazily.

Threading: tab handlers take ``host.mutation_lock()`` (A1111/Forge: ``call_queue.queue_lock``)
around every weight mutation; generation hooks already run under that lock and must never take
it again (it is not re-entrant), so ``LiveSession.sync`` only takes the session's own lock.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Optional, Protocol, Sequence

from ...errors import OutputPathError
from ...recipe import Recipe

if TYPE_CHECKING:
    from .live_session import LiveSession

INFOTEXT_RECIPE = "Merge recipe"


@dataclass(frozen=True)
class Checkpoint:
    title: str  # what pickers show (the host's title, e.g. "model.safetensors [0123abcdef]")
    path: Path


@dataclass
class BoardSettings:
    """The one settings section: output folder (inside the checkpoint folder), default dtype,
    worker threads, math device and the RAM cache for A's originals."""

    checkpoint_dir: Path
    output_subdir: str = ""
    dtype: str = "fp16"
    threads: int = 0  # 0 = engine default
    device: str = "cpu"
    cache_mb: int = 0  # 0 = keep every original of a patched key in RAM
    lora_dir: Optional[Path] = None  # the host's LoRA folder: the picker lists it, extractions go there

    @property
    def output_dir(self) -> Path:
        return confined_folder(self.checkpoint_dir, self.output_subdir)

    @property
    def cache_limit_bytes(self) -> Optional[int]:
        return None if self.cache_mb <= 0 else int(self.cache_mb) * 1024 * 1024


@dataclass
class PreviewRequest:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    sampler: str = "Euler a"
    # knobs a host offers beyond these (its ``options``: name, label, default, max), by name
    options: dict = field(default_factory=dict)


@dataclass
class PreviewResult:
    image: Any
    infotext: str


class Host(Protocol):
    """What the board needs from a WebUI (or from the standalone folder host)."""

    name: str
    has_sampler: bool

    def checkpoints(self, refresh: bool = False) -> list[Checkpoint]: ...

    def vaes(self) -> list[Checkpoint]: ...

    def loras(self) -> list[Checkpoint]: ...  # files of settings().lora_dir, titled by relative path

    def loaded_checkpoint(self) -> Optional[Path]: ...

    def live_target(self): ...  # lib_merge.live.LiveTarget or None when no model is loaded

    def mutation_lock(self) -> ContextManager: ...

    def settings(self) -> BoardSettings: ...

    def notes(self) -> list[str]: ...

    def after_save(self, path: Path) -> None: ...

    def run_preview(self, request: PreviewRequest, session: "LiveSession") -> PreviewResult: ...


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what A1111/Forge's Lora extension lists


def scan_loras(folder: Optional[Path]) -> list[Checkpoint]:
    """Every LoRA file under ``folder`` (subfolders included), titled by its path relative to it."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [Checkpoint(p.relative_to(folder).as_posix(), p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.suffix.lower() in LORA_SUFFIXES]


# -- output names -----------------------------------------------------------------------------------
_BAD_NAME = re.compile(r"[\x00-\x1f<>:\"|?*]")


def confined_folder(root: Path, subdir: str) -> Path:
    """``root/subdir`` where ``subdir`` is a plain relative folder name (no ``..``, no absolute path)."""
    subdir = (subdir or "").strip()
    if not subdir:
        return Path(root)
    parts = Path(subdir.replace("\\", "/")).parts
    if os.path.isabs(subdir) or any(p in ("..", "") for p in parts) or re.match(r"^[A-Za-z]:", subdir):
        raise OutputPathError(
            f"output folder {subdir!r} must be a folder name inside the checkpoint folder {root} (no '..', no absolute path)"
        )
    return Path(root).joinpath(*parts)


def output_path(folder: Path, name: str) -> Path:
    """The save path for a user-typed ``name``: a plain file name inside ``folder``.

    ``..``, absolute paths, path separators and control/reserved characters are rejected, the
    ``.safetensors`` suffix is added when missing, and the resolved path must stay in ``folder``."""
    raw = name
    name = (name or "").strip()
    if not name:
        raise OutputPathError("type a name for the merged model (a file name, no folders)")
    if name.startswith("~") or os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise OutputPathError(f"{raw!r} is an absolute path; type a plain file name — models are saved in {folder}")
    if ".." in name or name in (".",):
        raise OutputPathError(f"{raw!r} contains '..'; type a plain file name — models are saved in {folder}")
    if "/" in name or "\\" in name or os.sep in name:
        raise OutputPathError(f"{raw!r} contains a path separator; type a plain file name — models are saved in {folder}")
    if _BAD_NAME.search(name):
        raise OutputPathError(f"{raw!r} contains characters that cannot be in a file name (<>:\"|?* or control characters)")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    path = Path(folder) / name
    try:
        inside = path.resolve().parent == Path(folder).resolve()
    except OSError:
        inside = False
    if not inside:
        raise OutputPathError(f"{raw!r} would be written outside {folder}; type a plain file name")
    return path


# -- recipe <-> infotext -------------------------------------------------------------------------------
def recipe_infotext(recipe: Recipe) -> str:
    """Compact recipe for an image's infotext: file names instead of paths (JSON; the host quotes it)."""
    data = recipe.to_dict()
    data["models"] = [Path(m).name if os.sep in m or "/" in m else m for m in recipe.models]
    if data.get("vae"):
        data["vae"] = Path(data["vae"]).name
    if data.get("loras"):  # the live preview's LoRAs: file names too, and no empty hash
        data["loras"] = [{k: (Path(v).name if k == "path" else v) for k, v in lora.items() if v not in ("", None)}
                         for lora in data["loras"]]
    data.pop("model_hashes", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def arch_cache() -> "ArchCache":
    return _ARCHS


class ArchCache:
    """Architecture of checkpoint files from their headers, cached by (path, size, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Optional[str]] = {}
        self._lock = threading.Lock()

    def arch(self, path: Path) -> Optional[str]:
        if Path(path).suffix.lower() not in (".safetensors", ".sft"):
            return None  # pickles would have to be loaded whole just to look: keep them in every list
        try:
            st = Path(path).stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            from ...live import arch_of_file

            name = arch_of_file(path).name
        except Exception:
            name = None
        with self._lock:
            self._cache[key] = name
        return name


_ARCHS = ArchCache()


def filter_by_arch(items: Sequence[Checkpoint], arch: Optional[str]) -> list[Checkpoint]:
    if not arch:
        return list(items)
    return [c for c in items if _ARCHS.arch(c.path) in (arch, None)]
