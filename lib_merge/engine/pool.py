"""Keys side by side on a small thread pool.

Page faults on the mapped inputs, torch kernels and ``pwrite`` all release the GIL, so reading
one key overlaps the math and the write of others. At most ``threads`` keys are in flight, and
each is admitted only while the estimates of those in flight fit the memory budget, so peak
memory is bounded by threads × (inputs + 1) × the largest tensor — never by the model size.

Nothing here knows what a key's work is: the merge (``run``) and the soup pass it in.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Sequence

import torch

from ..many import MemoryGate
from ..plan import KeyJob


def default_threads() -> int:
    return max(2, min(4, (os.cpu_count() or 2) + 1))


def cap_threads(threads: int | None, warn: Callable[[str], None] | None = None) -> int | None:
    """At most 4 threads per core (at least 8): beyond that more threads only add memory
    (each holds a key) and contention. The note says what was used instead."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    cap = max(8, 4 * cores)
    if threads <= cap:
        return threads
    if warn:
        warn(f"threads={threads} is more than this machine can use ({cores} cores); using {cap}")
    return cap


def single_threaded_torch() -> None:
    """Parallelism comes from running keys side by side; torch's own intra-op threads on top of
    that oversubscribe the cores (measured 10× slower on a busy 2-core machine). torch also keeps
    the last count as the default of threads created later, so whoever starts the pool must put
    the caller's count back when the pool is done (``run_keys`` and ``map_keys`` do)."""
    torch.set_num_threads(1)


class StopFlag:
    """Set by failures inside the run; also reads as set when the caller's event is set."""

    def __init__(self, caller: threading.Event | None):
        self._caller = caller
        self._own = threading.Event()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._caller is not None and self._caller.is_set())

    def set(self) -> None:
        self._own.set()


class Counters:
    """Bytes read and written, added to from every worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read = 0
        self.written = 0

    def add_read(self, n: int) -> None:
        with self._lock:
            self.read += n

    def add_written(self, n: int) -> int:
        with self._lock:
            self.written += n
            return self.written


def run_keys(
    jobs: Sequence[KeyJob],
    work: Callable[[KeyJob], None],
    *,
    threads: int,
    cost: Callable[[KeyJob], int],
    budget: int | None,
    cancel: StopFlag,
    tick: Callable[[], None],
) -> None:
    """Run ``work(job)`` for every job, ``threads`` at a time, admitting a job only while the
    ``cost`` of those in flight fits ``budget``. ``tick`` runs on the calling thread while it
    waits (the merge keeps its resume file current there). The first failure in a worker sets
    ``cancel`` and is raised here once every worker has stopped; a cancel stops admitting jobs
    and returns, so the caller tells a cancel from a finished run by the flag."""
    slots = threading.BoundedSemaphore(threads)
    gate = MemoryGate(budget)
    failures: list[BaseException] = []

    def one(job: KeyJob, need: int) -> None:
        try:
            if cancel.is_set():
                return
            work(job)
        except BaseException as exc:  # surfaced in the calling thread below
            failures.append(exc)
            cancel.set()
        finally:
            gate.release(need)
            slots.release()

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lib_merge", initializer=single_threaded_torch)
    futures = []
    torch_threads = torch.get_num_threads()
    try:
        for job in jobs:
            acquired = False
            while not acquired and not cancel.is_set():
                acquired = slots.acquire(timeout=0.2)
                tick()
            if not acquired:
                break
            need = cost(job)
            if not gate.acquire(need, cancel, tick):
                slots.release()
                break
            futures.append(pool.submit(one, job, need))
        pending = futures
        while pending:
            pending = list(wait(pending, timeout=0.5).not_done)
            tick()
        pool.shutdown(wait=True)
        if failures:
            raise failures[0]
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        torch.set_num_threads(torch_threads)


def map_keys(
    keys: Iterable[str], fn: Callable[[str], Any], threads: int | None, name: str = "lib_merge"
) -> dict[str, Any]:
    """``{key: fn(key)}``, run on a small pool of single-threaded-torch workers; the first
    failure cancels the keys not yet started and is raised."""
    keys = list(keys)
    torch_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix=name,
                                initializer=single_threaded_torch) as pool:
            futures = {key: pool.submit(fn, key) for key in keys}
            results = {}
            try:
                for key in keys:
                    results[key] = futures[key].result()
            except BaseException:
                for f in futures.values():
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(torch_threads)
    return results
