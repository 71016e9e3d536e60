"""Where a plan's keys run: the executor seam between the driver (``run.execute``) and the work.

The driver checks every header, writes the output's header and reserves ``NAME.tmp`` once, then
hands an executor the keys still to do (``KeyRun``). An executor only fills in bytes at the
offsets the plan fixed; the driver alone completes keys, keeps the resume journal, reports
progress and finishes (hash, fsync, rename) or stops. Two executors:

    local  keys side by side on this process's threads (``pool.run_keys``) — the default
    ray    keys grouped into shards by bytes read; each shard is one Ray task that opens the
           inputs itself and writes into the reserved file (``ray_executor``, Ray imported
           only there and only when asked for)

Every key's bytes are a pure function of the plan (per-key seeds, fixed order of operations),
so which process, node or retry wrote a key never changes the file.

This module also holds what a remote worker needs on its side: ``ReservedFile`` (write parts
into the driver's reserved file, after checking it is that file) and ``merge_shard`` (one
shard of a merge).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch

from ..errors import BadParameterError, MergeError, OutputPathError
from ..io.dtypes import CODE_TO_TORCH
from ..io.reader import CheckpointReader, open_checkpoint
from ..lora.attach import attached_loras
from ..many import job_bytes
from ..plan import KeyJob, MergePlan, open_inputs, plan_merge
from ..recipe import Recipe
from ..vae import bake_vae
from .pool import Counters, StopFlag, run_keys

if TYPE_CHECKING:
    from ..io.writer import SafetensorsWriter
    from ..resume import Journal

# A shard should take seconds, not milliseconds: Ray's cost per task (scheduling, the result's
# round trip) is then noise, and a retry after a lost worker redoes little.
DEFAULT_SHARD_BYTES = 256 << 20


class ExecutorError(MergeError):
    """The executor cannot run here (Ray missing or unreachable, a node that cannot see a file)."""


@dataclass
class KeyRun:
    """What the driver hands an executor: the keys still to write and the driver-side
    bookkeeping (``finished`` after a key's bytes are in the file, ``tick`` while waiting)."""

    plan: MergePlan
    jobs: list[KeyJob]
    writer: SafetensorsWriter
    log: Journal | None
    counters: Counters
    total: int
    progress: Callable[[int, int, str], None] | None
    cancel: StopFlag
    threads: int
    budget: int | None
    bound: int  # the working set of one worker (``plan_memory``)
    durable: bool
    produce: Callable[..., Iterator[tuple[int, Any]]]  # produce_job, looked up by the driver

    def finished(self, job: KeyJob) -> None:
        self.writer.complete(job.key)
        if self.log is not None:
            self.log.record(job.key)
        written = self.counters.add_written(job.nbytes_out)
        if self.progress:
            self.progress(written, self.total, job.key)

    def tick(self) -> None:  # keeps the resume file current while the driver waits
        if self.log is not None and self.log.due():
            self.log.flush(self.writer.sync)


class Executor(Protocol):
    name: str

    def run(self, work: KeyRun) -> None:
        """Write every job of ``work``; return on completion or once ``work.cancel`` is set; raise
        the first failure (after setting ``work.cancel``)."""


class LocalExecutor:
    """Today's engine: keys side by side on ``threads`` threads of this process."""

    name = "local"

    def run(self, work: KeyRun) -> None:
        plan, writer, cancel = work.plan, work.writer, work.cancel

        def write_key(job: KeyJob) -> None:  # on a pool worker
            for offset, chunk in work.produce(plan, job, work.counters):
                if cancel.is_set():
                    return
                writer.write_part(job.key, offset, chunk)
            work.finished(job)

        run_keys(work.jobs, write_key, threads=work.threads, cost=lambda job: job_bytes(plan, job),
                 budget=work.budget, cancel=cancel, tick=work.tick)


@contextlib.contextmanager
def open_plan(recipe: Recipe) -> Iterator[MergePlan]:
    """The plan of ``recipe`` with its inputs open, its VAE baked in and its LoRAs attached, for
    the duration of the block: the driver's plan, and a remote worker's copy of it."""
    inputs = open_inputs(recipe.models)
    vae: CheckpointReader | None = None
    try:
        plan = plan_merge(recipe, inputs)
        if recipe.vae:
            vae = open_checkpoint(recipe.vae)
            bake_vae(plan, vae)
        with attached_loras(plan):
            yield plan
    finally:
        for item in inputs:
            if isinstance(item, CheckpointReader):
                item.close()
        if vae is not None:
            vae.close()


# -- shards -------------------------------------------------------------------------------------
@dataclass
class Shard:
    index: int
    keys: list[str]
    read_bytes: int  # input bytes its keys read (what a node pulls over the network)
    out_bytes: int


def group_shards(items: Sequence[tuple[str, int, int]], target: int) -> list[Shard]:
    """(key, bytes read, bytes written) in file order → consecutive runs of about ``target``
    bytes read each. Consecutive keys make each shard one contiguous stretch of the output, so
    the driver's in-order hash and write-back advance as shards finish."""
    if target < 1:
        raise BadParameterError(f"shard size {target}: use a positive size such as 256M")
    shards: list[Shard] = []
    keys: list[str] = []
    read = written = 0
    for key, r, w in items:
        keys.append(key)
        read += r
        written += w
        if read >= target:
            shards.append(Shard(len(shards), keys, read, written))
            keys, read, written = [], 0, 0
    if keys:
        shards.append(Shard(len(shards), keys, read, written))
    return shards


def job_read_bytes(plan: MergePlan, job: KeyJob) -> int:
    """Bytes of input files one key reads (virtual inputs read A's tensor, counted once)."""
    total = 0
    for index in job.sources:
        source = plan.inputs[index]
        if isinstance(source, CheckpointReader) and job.key in source.infos:
            total += source.infos[job.key].nbytes
    return total


# -- the worker's side --------------------------------------------------------------------------
def file_identity(paths: Sequence[str | os.PathLike[str]]) -> list[list[Any]]:
    """(path, size, mtime in whole seconds) of each input: what a worker checks before reading,
    so a node with another copy of a model fails instead of merging it (seconds, since network
    filesystems do not all keep nanoseconds)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, int(st.st_mtime)])
    return out


def check_inputs(expected: Sequence[Sequence[Any]]) -> None:
    problems = []
    for path, size, mtime in expected:
        try:
            st = os.stat(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            continue
        if st.st_size != size or int(st.st_mtime) != mtime:
            problems.append(f"{path}: another file than the driver's ({st.st_size} bytes, driver {size})")
    if problems:
        raise ExecutorError(
            f"node {socket.gethostname()}: cannot use the merge's inputs — {'; '.join(problems)}; every node must "
            "see the inputs and the output folder at the same paths (a shared or network filesystem)"
        )


class ReservedFile:
    """The driver's ``NAME.tmp``, opened by a worker to write its keys' bytes at their planned
    offsets. It refuses a file whose header is not the one the driver wrote (another file, a
    node that sees a different folder) before writing anything."""

    def __init__(self, path: str, header_sha256: str, *, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise ExecutorError(
                f"node {socket.gethostname()}: cannot open the reserved output {self.path} ({exc.strerror}); the "
                "output folder must be on storage every node sees at the same path"
            ) from None
        try:
            size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            header = os.pread(self._fd, 8 + size, 0) if 0 < size < 1 << 30 else b""
            if hashlib.sha256(header).hexdigest() != header_sha256:
                raise ExecutorError(f"node {socket.gethostname()}: {self.path} is not the file the driver reserved "
                                    "(its header differs); is the output folder shared by every node?")
            layout = json.loads(header[8:])
        except BaseException:
            os.close(self._fd)
            raise
        self.data_start = len(header)
        self._layout = {k: v for k, v in layout.items() if k != "__metadata__"}

    def write_part(self, key: str, element_offset: int, chunk: torch.Tensor) -> None:
        entry = self._layout.get(key)
        if entry is None:
            raise MergeError(f"{self.path}: key {key!r} is not in the reserved file")
        if CODE_TO_TORCH[entry["dtype"]] != chunk.dtype:
            raise MergeError(f"{self.path}: {key!r} chunk is {chunk.dtype}, planned {entry['dtype']}")
        begin, end = entry["data_offsets"]
        data = chunk.detach().contiguous().view(-1).view(torch.uint8)
        start = begin + element_offset * chunk.element_size()
        if start + data.numel() > end:
            raise MergeError(f"{self.path}: write past the end of {key!r}")
        view = memoryview(data.numpy())
        pos, done = self.data_start + start, 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], pos + done)
        except OSError as exc:
            raise OutputPathError(f"{self.path}: write failed on node {socket.gethostname()} ({exc.strerror})") from None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.write_part(key, 0, tensor)

    def complete(self, key: str) -> None:
        """The driver completes keys (hash, journal) once the shard is back; nothing to do here."""

    def close(self) -> None:
        """fsync before reporting back: the driver journals a shard's keys as soon as it returns."""
        try:
            if self.durable:
                os.fsync(self._fd)
        except OSError as exc:
            raise OutputPathError(f"{self.path}: fsync failed on node {socket.gethostname()} ({exc.strerror})") from None
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without fsync (the shard failed: its keys are redone, never journaled)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def worker_report(started: float, keys: int, read: int) -> dict[str, Any]:
    """What a shard reports back beside its keys: where and how long it ran, its process's peak RSS."""
    return {"keys": keys, "read": read, "seconds": time.perf_counter() - started, "pid": os.getpid(),
            "host": socket.gethostname(), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


@dataclass
class MergeShardSpec:
    """Everything a remote worker needs to redo the driver's plan and check it is the same one."""

    recipe: dict
    inputs: list[list[Any]]  # file_identity of every file the plan reads
    layout_sha256: str  # of the planned (key, shape, dtype) list
    tmp_path: str
    header_sha256: str
    threads: int
    budget: int | None
    durable: bool


def layout_digest(plan: MergePlan) -> str:
    """Every job as planned — layout, action, sources, resolved parameters — so a worker whose
    plan differs in anything that changes bytes refuses to write."""
    planned = [[j.key, list(j.shape), str(j.out_dtype), j.action, list(j.sources), j.identity, j.common_channels,
                repr(sorted(j.params.items())), j.patches is not None] for j in plan.jobs]
    return hashlib.sha256(json.dumps(planned, default=repr).encode()).hexdigest()


class _PlanCache:
    """A Ray worker process runs many shards of one merge: plan it once (headers of every input,
    a cosine pre-pass, the LoRAs opened) and keep the inputs mapped for the next shard."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.plan: MergePlan | None = None
        self._stack: contextlib.ExitStack | None = None

    def get(self, spec: MergeShardSpec) -> MergePlan:
        key = json.dumps([spec.recipe, spec.inputs, spec.layout_sha256], sort_keys=True)
        if key != self.key or self.plan is None:
            self.close()
            from ..recipe import Recipe
            
            stack = contextlib.ExitStack()
            try:
                plan = stack.enter_context(open_plan(Recipe.from_dict(spec.recipe, source="the driver")))
            except BaseException:
                stack.close()
                raise
            if layout_digest(plan) != spec.layout_sha256:
                stack.close()
                raise ExecutorError(f"node {socket.gethostname()}: this node plans another layout than the driver "
                                    "(another lib_merge version, or other input files); install the same version")
            self.key, self.plan, self._stack = key, plan, stack
        return self.plan

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self.key, self.plan, self._stack = None, None, None


_plans = _PlanCache()


def merge_shard(spec: MergeShardSpec, keys: list[str]) -> dict[str, Any]:
    """One shard of a merge, on a worker: check the inputs are the driver's, plan (or reuse the
    plan), compute the keys ``threads`` at a time under the memory budget, write them into the
    reserved file and fsync it."""
    from .produce import produce_job

    started = time.perf_counter()
    check_inputs(spec.inputs)
    try:
        plan = _plans.get(spec)
    except ExecutorError:
        raise
    except MergeError as exc:
        raise ExecutorError(f"node {socket.gethostname()}: {exc}") from None
    jobs_by_key = {j.key: j for j in plan.jobs}
    jobs = [jobs_by_key[k] for k in keys]
    out = ReservedFile(spec.tmp_path, spec.header_sha256, durable=spec.durable)
    counters, cancel = Counters(), StopFlag(None)
    try:
        def write_key(job: KeyJob) -> None:
            for offset, chunk in produce_job(plan, job, counters):
                out.write_part(job.key, offset, chunk)

        run_keys(jobs, write_key, threads=spec.threads, cost=lambda job: job_bytes(plan, job), budget=spec.budget,
                 cancel=cancel, tick=lambda: None)
    except BaseException:
        out.abandon()
        raise
    out.close()
    return worker_report(started, len(jobs), counters.read)
