"""The Ray executor: a merge's keys as shards, one Ray task per shard, on a local Ray instance or
a cluster (``--executor ray [--ray-address ADDR]``).

The driver has already checked every header, written the output's header and reserved
``NAME.tmp``. Each task gets the recipe (absolute paths) and its shard's keys — never tensors —
opens the inputs itself on its node, makes the same plan (checked against the driver's layout
digest), writes its keys into the reserved file at their planned offsets and fsyncs before
returning. The driver then completes those keys (in-order hash, resume journal, progress), so a
killed driver leaves a journal ``merge --resume`` continues, with or without Ray. A task lost
with its worker is retried by Ray (``max_retries``): it rewrites the same bytes.

Ray is imported here only, and this module only when ``--executor ray`` is asked for.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MemoryBudgetError, MergeError
from ..many import format_size
from ..methods import prepass_cache
from .executor import (
    DEFAULT_SHARD_BYTES, ExecutorError, KeyRun, MergeShardSpec, Shard, file_identity, group_shards, job_read_bytes,
    layout_digest, merge_shard,
)
from .output import _absolute_recipe, input_files
from .pool import StopFlag

INSTALL = 'pip install "ray[default]"  (or, in this checkout, pip install ".[ray]")'
MAX_RETRIES = 3  # a task whose worker died is rerun this many times before the merge fails
CANCEL_GRACE_S = 10.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed here; install it with {INSTALL}") from None
    return ray


@dataclass
class RayStats:
    """What the last run measured: per shard, the driver's round trip and the task's own time."""

    shards: int = 0
    wall: float = 0.0  # first submit → last result
    task_seconds: list[float] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)  # "host:pid" → the worker process's peak RSS
    retried: int = 0


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, shard_bytes: int | None = None, *, num_cpus: int | None = None):
        self.address = address
        self.shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
        self.num_cpus = num_cpus  # a local instance's CPUs (None: Ray's default, every core)
        self.stats = RayStats()
        import_ray()  # the clear error before any file is touched

    def run(self, work: KeyRun) -> None:
        plan = work.plan
        recipe = _absolute_recipe(plan.recipe)
        recipe["loras"] = [{**lora, "path": str(Path(lora["path"]).resolve())} for lora in recipe.get("loras") or []]
        spec = MergeShardSpec(
            recipe=recipe,
            inputs=_identities(plan),
            layout_sha256=layout_digest(plan),
            tmp_path=str(work.writer.tmp_path.resolve()),
            header_sha256=_sha256(work.writer.header_bytes),
            threads=work.threads,
            budget=work.budget,
            durable=work.durable,
        )
        jobs = {j.key: j for j in work.jobs}
        shards = group_shards([(j.key, job_read_bytes(plan, j), j.nbytes_out) for j in work.jobs], self.shard_bytes)

        def done(shard: Shard, result: dict[str, Any]) -> None:
            work.counters.add_read(result["read"])
            for key in shard.keys:
                work.finished(jobs[key])
            if work.log is not None:  # the shard's bytes were fsynced by its worker: journal them now
                work.log.flush(work.writer.sync)

        seed = prepass_cache.seed_of(plan)
        fn, payload = (merge_shard, spec) if seed is None else (_seeded_merge_shard, (spec, seed))
        self.run_shards(fn, payload, shards, memory=work.bound, cancel=work.cancel, on_done=done, tick=work.tick)

    def run_shards(
        self, fn: Callable[[Any, list[str]], dict], payload: Any, shards: Sequence[Shard], *, memory: int,
        cancel: StopFlag, on_done: Callable[[Shard, dict], None], tick: Callable[[], None] = lambda: None,
    ) -> None:
        """Run ``fn(payload, shard.keys)`` as one Ray task per shard, each reserving one CPU and
        ``memory`` bytes of the node's memory; ``on_done`` on the driver as each returns. At most
        two tasks per cluster CPU are outstanding, so a cancel or a failure stops soon and the
        file fills roughly in order. The first failure cancels the rest and is raised."""
        ray = import_ray()
        self.stats = stats = RayStats(shards=len(shards))
        with _session(ray, self.address, self.num_cpus):
            _check_memory(ray, memory)
            task = ray.remote(fn).options(num_cpus=1, memory=max(1, memory), max_retries=MAX_RETRIES,
                                          retry_exceptions=False, name="lib_merge-shard")
            window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
            queue = collections.deque(shards)
            pending: dict[Any, tuple[Shard, float]] = {}
            started = time.perf_counter()
            try:
                while queue or pending:
                    while queue and len(pending) < window and not cancel.is_set():
                        shard = queue.popleft()
                        pending[task.remote(payload, shard.keys)] = (shard, time.perf_counter())
                    if cancel.is_set():
                        break
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                    for ref in ready:
                        shard, submitted = pending.pop(ref)
                        result = _result(ray, ref, shard)
                        stats.round_trips.append(time.perf_counter() - submitted)
                        stats.task_seconds.append(result["seconds"])
                        who = f"{result['host']}:{result['pid']}"
                        stats.peak_rss[who] = max(stats.peak_rss.get(who, 0), result["peak_rss"])
                        on_done(shard, result)
                    tick()
            except BaseException:
                cancel.set()
                raise
            finally:
                stats.wall = time.perf_counter() - started
                _cancel(ray, pending)


def _result(ray, ref, shard: Shard) -> dict:
    """The task's report, or its failure as our own error: a MergeError raised on a node is
    re-raised as it is (one clear line); a worker that died more often than Ray retries is named."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (MergeError, KeyboardInterrupt)):
            raise cause from None
        raise MergeError(f"shard {shard.index} ({shard.keys[0]} …) failed on a Ray worker: "
                         f"{type(cause).__name__ if cause else 'error'}: {cause or exc}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as exc:
        raise MergeError(
            f"shard {shard.index} ({shard.keys[0]} …): its Ray worker was lost on each of {MAX_RETRIES + 1} tries "
            f"({type(exc).__name__}); out of memory on a node? lower --max-memory or --threads"
        ) from None


def _cancel(ray, pending: dict) -> None:
    """Stop what is still running before the driver closes or removes the file: a cancel
    interrupts a task between keys; one that does not stop in time is killed."""
    if not pending:
        return
    refs = list(pending)
    for ref in refs:
        ray.cancel(ref, force=False)
    _, left = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    for ref in left:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone: nothing left to stop
            pass


class _session:
    """Use the Ray the process already runs (a test, a notebook), or start one for this run:
    ``address`` joins a cluster; none starts a local instance, shut down afterwards."""

    def __init__(self, ray, address: str | None, num_cpus: int | None):
        self.ray, self.address, self.num_cpus = ray, address, num_cpus
        self.owned = False

    def __enter__(self):
        ray = self.ray
        if ray.is_initialized():
            return self
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                   "log_to_driver": False, "configure_logging": True}
        if self.address:
            options["address"] = self.address
        elif self.num_cpus:
            options["num_cpus"] = self.num_cpus
        try:
            ray.init(**options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise ExecutorError(f"cannot start or reach {where} ({str(exc).splitlines()[0] if str(exc) else exc}); "
                                "on the head node run `ray start --head` and pass the address it prints") from None
        self.owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()


def _seeded_merge_shard(payload: tuple, keys: list[str]) -> dict[str, Any]:
    """``merge_shard`` on a worker that first takes the driver's whole-model pre-pass result (the
    cosine similarity range), so its plan does not read both models again."""
    spec, seed = payload
    prepass_cache.remember(seed)
    return merge_shard(spec, keys)


def _check_memory(ray, memory: int) -> None:
    """A task that asks for more memory than any node has would wait forever: refuse it now."""
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest and memory > largest:
        raise MemoryBudgetError(
            f"each Ray worker needs {format_size(memory)} (the plan's working set for --threads and --max-memory) "
            f"but the largest node offers {format_size(largest)} to Ray; lower --max-memory or --threads, or add a "
            "node with more memory"
        )


def _identities(plan) -> list[list[Any]]:
    """What each worker checks its inputs against: the files the driver has open (through their
    descriptors, so a name that changed since planning is still the driver's file), the VAE and
    the LoRAs by name."""
    opened = {Path(r.path).resolve(): getattr(r, "_fd", -1) for r in plan.readers}
    out = []
    for path in (Path(p).resolve() for p in input_files(plan)):
        fd = opened.get(path, -1)
        if fd >= 0:
            st = os.fstat(fd)
            out.append([str(path), st.st_size, int(st.st_mtime)])
        else:
            out.extend(file_identity([path]))
    return out


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
