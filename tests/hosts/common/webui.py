# Follows modules/fifo_lock.py, modules/options.py, modules/shared_state.py and sd_models.CheckpointInfo of A1111 v1.10.1 and Forge dfdcbab685e5, alike.
"""Host-neutral pieces of both WebUIs, alike in A1111 v1.10.1 and Forge: the queue lock, the
options object, the job state, the checkpoint record, and the image a weights-only model stands in
for. No module state here: each host's modules make their own instances."""
from __future__ import annotations

import collections
import threading
from pathlib import Path

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


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section


class Options:
    """modules/options.py Options (shared.opts): attribute access to data, falling back to registered defaults."""

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
    """modules/shared_state.py State: the parts generation, the samplers and X/Y/Z touch."""

    def __init__(self):
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
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


def fingerprint(unet) -> float:
    """Stands in for an image: one number that depends on every weight."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in unet.parameters()))


def weights_image(unet):
    """The decoded image of a weights-only model (the Merge Board's tests load U-Net weights with no
    text encoder and nothing to sample with): 8x8 pixels whose ``info["fingerprint"]`` depends on
    every weight the U-Net holds at sampling time."""
    from PIL import Image

    value = fingerprint(unet)
    image = Image.new("RGB", (8, 8), (int(abs(value)) % 256, 0, 0))
    image.info["fingerprint"] = value
    return image
