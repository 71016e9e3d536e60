"""Run memory-bound tensor work on a thread of its own whose torch ops use one intra-op thread,
leaving the caller's setting and the default of threads started later as they were.

Why: on a 2-core machine that other processes keep busy, every torch op split over two OpenMP
threads waits for whichever is descheduled. The board's Compare of two 2 GB SD1.5 files took
78 s on the real A1111 with torch's 2 threads and 4.9 s with one (same process, minutes apart).
``torch.set_num_threads`` is process-wide (it also sets the default that threads started later
inherit), so it is set on a fresh thread and the default is put back before any work starts.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def on_one_torch_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread with one torch intra-op thread; its result or exception."""
    caller = torch.get_num_threads()
    outcome: dict[str, object] = {}
    configured, restored = threading.Event(), threading.Event()

    def work() -> None:
        try:
            # get_num_threads first: it runs torch's lazy per-thread initialisation, which would
            # otherwise reset this thread to the process default at its first parallel op.
            torch.get_num_threads()
            torch.set_num_threads(1)
        finally:
            configured.set()
        restored.wait()
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="lib_merge_one_thread", daemon=True)
    worker.start()
    configured.wait()
    torch.set_num_threads(caller)  # the process default back; the worker keeps its own setting
    restored.set()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
