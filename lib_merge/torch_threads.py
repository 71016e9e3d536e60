"""Run memory-bound tensor work on a thread of its own whose torch ops use one intra-op thread,
leaving the caller's setting and the default of threads started later as they were.

Why: on a 2-core machine that other processes keep busy, every torch op split over two OpenMP
threads waits for whichever is descheduled. The board's Compare of two 2 GB SD1.5 files took
78 s on the real A1111 with torch's 2 threads and 4.9 s with one (same process, minutes apart).
``torch.set_num_threads`` is process-wide (it also sets the default that threads started later
inherit), so it is set on a worker thread of its own and the default is put back before any
work starts.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_worker_ident: int | None = None


def _configure() -> None:
    global _worker_ident
    _worker_ident = threading.get_ident()
    # get_num_threads first: it runs torch's lazy per-thread initialisation, which would otherwise
    # reset this thread to the process default at its first parallel op.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _worker() -> ThreadPoolExecutor:
    """One long-lived worker (its scratch buffers outlive a call), configured on first use."""
    global _pool
    with _lock:
        if _pool is None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="lib_merge_one_thread")
            caller = torch.get_num_threads()
            try:
                pool.submit(_configure).result()
            finally:
                torch.set_num_threads(caller)  # the process default back; the worker keeps its own
            _pool = pool
        return _pool


def on_one_torch_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the worker with one torch intra-op thread; its result, or its
    exception raised here. Calls from the worker itself run inline (no deadlock)."""
    if threading.get_ident() == _worker_ident:
        return fn(*args, **kwargs)
    return _worker().submit(fn, *args, **kwargs).result()
