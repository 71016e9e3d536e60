"""Run a plan into one output file: the driver of plan → method → writer.

``execute`` checks the request, hashes the inputs, opens the output (with a resume journal for
long runs), feeds every key's chunks from ``produce_job`` to the writer on the key pool, then
either finishes (fsync, atomic rename, output hash) or stops (partial file kept for --resume,
or removed). ``merge`` plans a recipe first.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BadParameterError, MergeCancelled
from ..io.hashing import remember_sha256, sha256_file, short_hash
from ..io.reader import CheckpointReader
from ..many import MemoryPlan, parse_size, plan_memory
from ..plan import MergePlan, model_label
from ..recipe import Recipe
from ..resume import AUTO_MIN_BYTES
from .output import check_output_name, clear_stale_journal, open_output, stop, stopped_message
from .executor import Executor, KeyRun, LocalExecutor, open_plan
from .pool import Counters, StopFlag, cap_threads, default_threads
from .produce import produce_job

ProgressFn = Callable[[int, int, str], None]  # (done_bytes, total_bytes, key)


@dataclass
class MergeResult:
    path: Path
    sha256: str | None
    seconds: float
    bytes_read: int
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    memory: MemoryPlan | None = None
    resumed_keys: int = 0  # keys kept from an interrupted run (merge --resume)

    @property
    def short_hash(self) -> str | None:
        return short_hash(self.sha256) if self.sha256 else None


def merge(
    recipe: Recipe,
    output: str | os.PathLike[str],
    *,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> MergeResult:
    """Plan ``recipe`` (its VAE baked in) and run it into ``output``; ``options`` are
    :func:`execute`'s (threads, overwrite, progress, cancel, hashing, durable, max_memory, journal,
    resume, on_plan, executor)."""
    with open_plan(recipe) as plan:
        for message in plan.warnings:
            if warn:
                warn(message)
        return execute(plan, output, warn=warn, **options)


def execute(
    plan: MergePlan,
    output: str | os.PathLike[str],
    *,
    threads: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    hash_inputs: bool = True,
    hash_output: bool = True,
    durable: bool = True,
    max_memory: int | str | None = None,
    journal: bool | None = None,
    resume: bool = False,
    on_plan: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> MergeResult:
    """Run ``plan`` into ``output``. ``durable`` fsyncs the file before the atomic rename, so a
    crash or power loss can never leave a half-written file under the final name.

    ``max_memory`` (bytes or '24G') caps the working set: keys are admitted while their
    estimates fit (see ``lib_merge.many``); ``on_plan`` receives the bound before any work.
    ``journal`` writes a resume file (None: only for runs reading ≥ 8 GiB); on a failure or a
    cancel the partial file and the resume file are then kept, and ``resume=True`` continues
    from them — the result is bit for bit that of an uninterrupted run. ``executor`` runs the keys
    (default: this process's threads; ``executor.make_executor('ray')`` for a Ray cluster, where
    ``threads`` and ``max_memory`` apply to each worker)."""
    from ..metadata import build_metadata

    started = time.perf_counter()
    out_path = Path(output)
    check_output_name(out_path)
    if threads is not None and threads < 1:
        raise BadParameterError(f"threads={threads}: use 1 or more, or leave it out for the default ({default_threads()})")
    # The caller's event only ever tells us to stop; a failure inside stops the run through our
    # own flag, so a UI that reuses its Event does not see its next merge "cancelled".
    cancel = StopFlag(cancel)
    threads = cap_threads(threads, warn) or default_threads()
    memory = plan_memory(plan, threads, parse_size(max_memory))
    if on_plan:
        on_plan(memory.describe(plan))
    hashes = _input_hashes(plan, hash_inputs, warn)
    metadata = build_metadata(plan, hashes, out_path)
    planned = [(j.key, j.shape, j.out_dtype) for j in plan.jobs]
    read_total = sum(info.nbytes for r in plan.readers for info in r.infos.values())
    use_journal = resume or (journal if journal is not None else read_total >= AUTO_MIN_BYTES)
    clear_stale_journal(out_path, resume=resume, overwrite=overwrite)
    settings = {"threads": threads, "max_memory": memory.budget} if use_journal else None
    writer, log, done = open_output(plan, out_path, planned, metadata, settings,
                                    resume=resume, overwrite=overwrite, durable=durable, hash_output=hash_output)
    total = sum(j.nbytes_out for j in plan.jobs)
    counters = Counters()
    counters.written = sum(j.nbytes_out for j in plan.jobs if j.key in done)
    work = KeyRun(plan, [j for j in plan.jobs if j.key not in done], writer, log, counters, total, progress, cancel,
                  threads, memory.budget, memory.bound, durable, produce_job)
    try:
        (executor or LocalExecutor()).run(work)
    except BaseException as exc:
        stop(writer, log)
        if isinstance(exc, KeyboardInterrupt):
            raise MergeCancelled(stopped_message(out_path, log, "interrupted")) from None
        raise
    if cancel.is_set():
        stop(writer, log)
        raise MergeCancelled(stopped_message(out_path, log, "cancelled"))
    writer.finish()
    if log is not None:
        log.remove()
    digest = writer.sha256  # hashed while the merge ran, from the bytes the file holds
    if digest:
        remember_sha256(out_path, digest)
    return MergeResult(
        out_path, digest, time.perf_counter() - started, counters.read, counters.written, list(plan.warnings),
        memory, len(done),
    )


def _input_hashes(plan: MergePlan, hash_inputs: bool, warn: Callable[[str], None] | None) -> list[str]:
    """sha256 of each model file ('' where not hashed), for the output's metadata; a model that
    is not the file the recipe recorded is worth a warning, since the result will differ."""
    models = plan.inputs[:len(plan.recipe.models)]  # a baked VAE is one more input, not a model
    hashes = [sha256_file(r.path) if hash_inputs and isinstance(r, CheckpointReader) else "" for r in models]
    recorded = plan.recipe.model_hashes
    if warn and any(hashes) and len(recorded) == len(hashes):
        for index, (now, then) in enumerate(zip(hashes, recorded)):
            if now and then and now != then:
                warn(f"{model_label(index, plan.inputs[index])} is not the file the recipe recorded "
                     f"(sha256 {now[:10]} vs {then[:10]}); the result will differ from the original merge")
    return hashes
