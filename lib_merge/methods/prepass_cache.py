"""Whole-model pre-pass results (cosine's similarity range), remembered in the process.

A pre-pass reads every key of two models before anything is planned. The board's live preview
plans again on every change and each Ray worker plans its shards, so the result is kept for the
last few input sets, keyed by what identifies each input file's content — resolved path, size,
mtime_ns, and the sha256 the recipe records for it (if any) — and by the pre-pass's parameters.
A touched or replaced file has another key and is read again. The driver of a Ray merge hands
its entry to the workers (``seed_of`` → ``remember``): a worker whose files have the same
identities plans without the pass; one whose files differ misses and computes it.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable

ENTRIES = 8  # a few recent model pairs; each entry is a handful of numbers


class PrepassCache:
    """A small LRU map, safe to share between the board's threads."""

    def __init__(self, size: int = ENTRIES):
        self.size = size
        self._entries: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                return None
            self._entries.move_to_end(key)
            return dict(value)

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        with self._lock:
            self._entries[key] = dict(value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = PrepassCache()


def input_identity(reader: Any, recorded_sha256: str = "") -> tuple | None:
    """(resolved path, size, mtime_ns, recorded sha256) of an input read from a file; None for
    one that is not (an in-memory reader), which is then never cached."""
    path = getattr(reader, "path", None)
    if path is None:
        return None
    fd = getattr(reader, "_fd", None)  # the file the reader has open, even if the name moved since
    try:
        st = os.fstat(fd) if isinstance(fd, int) and fd >= 0 else os.stat(path)
        resolved = str(Path(path).resolve(strict=True))
    except OSError:
        return None
    return (resolved, st.st_size, st.st_mtime_ns, recorded_sha256 or "")


def plan_key(plan: Any, sources: tuple[int, ...], params: tuple) -> tuple | None:
    """The cache key of a pre-pass over ``plan.inputs[i]`` for i in ``sources``, or None."""
    hashes = tuple(plan.recipe.model_hashes or ())
    identities = []
    for index in sources:
        ident = input_identity(plan.inputs[index], hashes[index] if index < len(hashes) else "")
        if ident is None:
            return None
        identities.append(ident)
    return (plan.method.name, params, tuple(identities))


def seed_of(plan: Any) -> tuple | None:
    """(key, value) of this plan's pre-pass if it is cached, for a Ray worker to start with."""
    key_of = getattr(getattr(plan.method.fn, "prepass", None), "cache_key", None)
    key = key_of(plan) if key_of is not None else None
    value = CACHE.get(key) if key is not None else None
    return None if value is None else (key, value)


def remember(seed: tuple | None) -> None:
    if seed is not None:
        CACHE.put(*seed)
