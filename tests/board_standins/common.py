"""Pieces shared by the A1111 and Forge stand-ins: each mirrors the real module surface the
Merge Board uses (webui-api.md §1, §3, §5-7 and the real sources), nothing more."""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class FIFOLock:
    """modules/fifo_lock.py, plus bookkeeping for the tests: who holds it, and a re-entrant
    acquire (a deadlock in the real WebUI) raises instead of hanging."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads = collections.deque()
        self.owner = None
        self.acquisitions = 0

    def acquire(self, blocking=True):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock acquired twice by one thread: the real FIFOLock deadlocks here")
        with self._inner_lock:
            if self._lock.acquire(False):
                self.owner, self.acquisitions = threading.get_ident(), self.acquisitions + 1
                return True
            if not blocking:
                return False
            event = threading.Event()
            self._pending_threads.append(event)
        event.wait()
        self._lock.acquire()
        self.owner, self.acquisitions = threading.get_ident(), self.acquisitions + 1
        return True

    def release(self):
        with self._inner_lock:
            self.owner = None
            if self._pending_threads:
                self._pending_threads.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()

    def held_by_me(self) -> bool:
        return self.owner == threading.get_ident()


class Callbacks:
    """modules/script_callbacks.py: named lists of callbacks, registered at import."""

    def __init__(self):
        self.lists: dict[str, list] = collections.defaultdict(list)

    def add(self, category, fn):
        self.lists[category].append(fn)

    def call(self, category, *args):
        return [fn(*args) for fn in list(self.lists[category])]


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    """shared.opts: attribute access to data, falling back to registered defaults."""

    def __init__(self, **data):
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


class State:
    """shared.state (the parts generation and X/Y/Z touch)."""

    def __init__(self):
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.interrupted = False
        self.begun = 0

    def begin(self, job="(unknown)"):
        self.begun += 1
        self.job = job

    def end(self):
        self.job = ""


class CheckpointInfo:
    """sd_models.CheckpointInfo: title = "name [shorthash]" (shorthash from a cached sha256)."""

    def __init__(self, filename, model_path):
        self.filename = str(filename)
        path = Path(filename)
        try:
            self.name = str(path.relative_to(model_path))
        except ValueError:
            self.name = path.name
        self.name_for_extra = path.stem
        self.model_name = path.stem
        self.shorthash = None
        self.title = self.name
        self.short_title = self.name_for_extra


@dataclass
class Processed:
    images: list
    infotexts: list
    info: str = ""


def create_infotext(p) -> str:
    """processing.create_infotext: the prompt line, then "key: value" pairs (values with , : or
    newline JSON-quoted, as infotext_utils.quote does)."""
    import json

    def quote(text):
        text = str(text)
        return json.dumps(text, ensure_ascii=False) if ("," in text or ":" in text or "\n" in text) else text

    params = {"Steps": p.steps, "Sampler": p.sampler_name, "Seed": p.seed, "Size": f"{p.width}x{p.height}"}
    params.update({k: v for k, v in (p.extra_generation_params or {}).items() if v is not None})
    return f"{p.prompt}\n" + ", ".join(f"{k}: {quote(v)}" for k, v in params.items())


@dataclass
class StableDiffusionProcessingTxt2Img:
    """processing.StableDiffusionProcessingTxt2Img: the fields the board and X/Y/Z set."""

    sd_model: Any = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    batch_size: int = 1
    n_iter: int = 1
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    override_settings: dict = None
    scripts: Any = None
    script_args: Any = None

    def __post_init__(self):
        self.extra_generation_params = self.extra_generation_params or {}

    def close(self):
        pass


def fingerprint(unet) -> float:
    """Stands in for an image: one number that depends on every weight."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in unet.parameters()))


def processed_from(p, unet) -> Processed:
    """The Processed of one txt2img run: an 8x8 image standing in for the decoded latent (its
    ``info["fingerprint"]`` depends on every weight of the U-Net that sampled) and the infotext."""
    from PIL import Image

    value = fingerprint(unet)
    image = Image.new("RGB", (8, 8), (int(abs(value)) % 256, 0, 0))
    image.info["fingerprint"] = value
    return Processed([image], [create_infotext(p)])


def exec_shared(name: str, namespace: dict) -> None:
    """Run ``shared_src/<name>.py`` inside a host's own ``modules.<name>`` namespace. Both hosts ship
    that module, or that part of it, alike; executing (not importing) the one source keeps each
    installed host's module state fresh, as a real import of its own copy would."""
    from pathlib import Path

    path = Path(__file__).with_name("shared_src") / f"{name}.py"
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
