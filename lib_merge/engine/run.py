"""Execution: key by key, read → fp32 → method → cast → write → free.

A small thread pool runs several keys at once; page faults on the mapped inputs, torch kernels
and ``pwrite`` all release the GIL, so reading one key overlaps the math and the write of others.
At most ``threads`` keys are in flight, so peak memory is bounded by
threads × (inputs + 1) × the largest tensor — never by the model size.

Elementwise methods go further: each key is streamed through small per-thread buffers straight
into the output file, so the merged tensor never exists in memory. On this machine class memory
bandwidth, not arithmetic, is the limit: every full-size pass over a tensor (a fresh output, a
NaN scan, an fp32 copy) costs about as much as reading it, so chunks that stay in cache are what
brings a merge close to the I/O floor.
"""
from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import BadParameterError, MergeCancelled, NonFiniteError, OutputPathError, ResumeError
from ..inputs import VirtualInput
from ..io.hashing import sha256_file, short_hash
from ..io.reader import CheckpointReader, open_checkpoint
from ..io.writer import SafetensorsWriter, plan_layout, temp_path_for
from ..many import MemoryGate, MemoryPlan, SourceHandle, job_bytes, parse_size, plan_memory, stream_chunk
from ..methods.registry import KeyContext, MethodSpec
from ..methods.sparsify import ChunkContext
from ..plan import KeyJob, MergePlan, model_label, open_inputs, plan_merge
from ..recipe import Recipe
from ..resume import AUTO_MIN_BYTES, Journal, journal_path
from ..vae import bake_vae

# Elementwise methods run over flat chunks this size: the fp32 working set of one chunk stays in
# cache instead of materialising full-size fp32 temporaries (several times faster on 2 cores).
CHUNK_ELEMENTS = 1 << 18

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


def merge(
    recipe: Recipe,
    output: str | os.PathLike[str],
    *,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> MergeResult:
    """Plan ``recipe`` (its VAE baked in) and run it into ``output``; ``options`` are
    :func:`execute`'s (threads, overwrite, progress, cancel, hashing, durable, max_memory, journal,
    resume, on_plan)."""
    inputs = open_inputs(recipe.models)
    vae: CheckpointReader | None = None
    try:
        plan = plan_merge(recipe, inputs)
        if recipe.vae:
            vae = open_checkpoint(recipe.vae)
            bake_vae(plan, vae)
        for message in plan.warnings:
            if warn:
                warn(message)
        return execute(plan, output, warn=warn, **options)
    finally:
        for item in inputs:
            if isinstance(item, CheckpointReader):
                item.close()
        if vae is not None:
            vae.close()


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
) -> MergeResult:
    """Run ``plan`` into ``output``. ``durable`` fsyncs the file before the atomic rename, so a
    crash or power loss can never leave a half-written file under the final name.

    ``max_memory`` (bytes or '24G') caps the working set: keys are admitted while their
    estimates fit (see ``lib_merge.many``); ``on_plan`` receives the bound before any work.
    ``journal`` writes a resume file (None: only for runs reading ≥ 8 GiB); on a failure or a
    cancel the partial file and the resume file are then kept, and ``resume=True`` continues
    from them — the result is bit for bit that of an uninterrupted run."""
    from ..metadata import build_metadata

    started = time.perf_counter()
    out_path = Path(output)
    if out_path.suffix.lower() not in (".safetensors", ".sft"):
        # A1111 and our own reader open .ckpt/.pt with torch.load: safetensors bytes under such a
        # name would be a file that nothing can load
        raise OutputPathError(f"{out_path}: merged models are written as safetensors; name the output *.safetensors")
    if threads is not None and threads < 1:
        raise BadParameterError(f"threads={threads}: use 1 or more, or leave it out for the default ({default_threads()})")
    # The caller's event only ever tells us to stop; a failure inside stops the run through our
    # own flag, so a UI that reuses its Event does not see its next merge "cancelled".
    cancel = _StopFlag(cancel)
    threads = cap_threads(threads, warn) or default_threads()
    memory = plan_memory(plan, threads, parse_size(max_memory))
    if on_plan:
        on_plan(memory.describe(plan))
    models = plan.inputs[:len(plan.recipe.models)]  # a baked VAE is one more input, not a model
    hashes = [sha256_file(r.path) if hash_inputs and isinstance(r, CheckpointReader) else "" for r in models]
    recorded = plan.recipe.model_hashes
    if warn and any(hashes) and len(recorded) == len(hashes):
        for index, (now, then) in enumerate(zip(hashes, recorded)):
            if now and then and now != then:
                warn(f"{model_label(index, plan.inputs[index])} is not the file the recipe recorded "
                     f"(sha256 {now[:10]} vs {then[:10]}); the result will differ from the original merge")
    metadata = build_metadata(plan, hashes, out_path)
    planned = [(j.key, j.shape, j.out_dtype) for j in plan.jobs]
    read_total = sum(info.nbytes for r in plan.readers for info in r.infos.values())
    use_journal = resume or (journal if journal is not None else read_total >= AUTO_MIN_BYTES)
    stale = journal_path(out_path)
    if not resume and stale.exists():
        if not overwrite:
            raise ResumeError(
                f"{out_path}: an interrupted merge of this output can be continued — add --resume; "
                f"or pass --overwrite (or delete {stale.name}) to start over"
            )
        try:
            stale.unlink()
        except OSError as exc:
            raise OutputPathError(f"{stale}: cannot remove the old resume file ({exc.strerror}); delete it by hand") from None
    log: Journal | None = None
    done: set[str] = set()
    if use_journal:
        _, header = plan_layout(planned, metadata, out_path)
        log = Journal(out_path, header, [r.path for r in plan.readers], _absolute_recipe(plan.recipe),
                      {"threads": threads, "max_memory": memory.budget})
        if resume:
            done = log.completed()  # checked before the partial file is touched
    writer = SafetensorsWriter(
        out_path,
        planned,
        metadata,
        inputs=[r.path for r in plan.readers],
        overwrite=overwrite,
        durable=durable,
        resume=resume,
    )
    if log is not None:
        if not writer.resumed:
            done = set()  # no usable partial file: everything is redone
        writer.mark_written(done)
        try:
            log.open(keep=resume and writer.resumed)
        except BaseException:
            if writer.resumed:
                writer.keep_partial()  # the earlier resume file still describes it
            else:
                writer.abort()  # no resume file, so nothing could continue the partial output
            raise
    total = sum(j.nbytes_out for j in plan.jobs)
    counters = _Counters()
    counters.written = sum(j.nbytes_out for j in plan.jobs if j.key in done)
    slots = threading.BoundedSemaphore(threads)
    gate = MemoryGate(memory.budget)

    failures: list[BaseException] = []

    def run(job: KeyJob, need: int) -> None:
        try:
            if cancel.is_set():
                return
            for offset, chunk in produce_job(plan, job, counters):
                if cancel.is_set():
                    return
                writer.write_part(job.key, offset, chunk)
            writer.complete(job.key)
            if log is not None:
                log.record(job.key)
            written = counters.add_written(job.nbytes_out)
            if progress:
                progress(written, total, job.key)
        except BaseException as exc:  # surfaced in the main thread below
            failures.append(exc)
            cancel.set()
        finally:
            gate.release(need)
            slots.release()

    def tick() -> None:  # runs on the main thread while it waits: keeps the resume file current
        if log is not None and log.due():
            log.flush(writer.sync)

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lib_merge", initializer=single_threaded_torch)
    futures = []
    torch_threads = torch.get_num_threads()
    try:
        for job in plan.jobs:
            if job.key in done:
                continue
            acquired = False
            while not acquired and not cancel.is_set():
                acquired = slots.acquire(timeout=0.2)
                tick()
            if not acquired:
                break
            need = job_bytes(plan, job)
            if not gate.acquire(need, cancel, tick):
                slots.release()
                break
            futures.append(pool.submit(run, job, need))
        pending = futures
        while pending:
            pending = list(wait(pending, timeout=0.5).not_done)
            tick()
        pool.shutdown(wait=True)
        if failures:
            raise failures[0]
    except BaseException as exc:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        _stop(writer, log)
        if isinstance(exc, KeyboardInterrupt):
            raise MergeCancelled(_stopped_message(out_path, log, "interrupted")) from None
        raise
    pool.shutdown(wait=True)
    torch.set_num_threads(torch_threads)
    if cancel.is_set():
        _stop(writer, log)
        raise MergeCancelled(_stopped_message(out_path, log, "cancelled"))
    writer.finish()
    if log is not None:
        log.remove()
    digest = sha256_file(out_path) if hash_output else None
    return MergeResult(
        out_path, digest, time.perf_counter() - started, counters.read, counters.written, list(plan.warnings),
        memory, len(done),
    )


class _StopFlag:
    """Set by failures inside the run; also reads as set when the caller's event is set."""

    def __init__(self, caller: threading.Event | None):
        self._caller = caller
        self._own = threading.Event()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._caller is not None and self._caller.is_set())

    def set(self) -> None:
        self._own.set()


def _stop(writer: SafetensorsWriter, log: Journal | None) -> None:
    """After a failure or a cancel: without a resume file remove the partial output; with one,
    make what was written durable and keep both for ``merge --resume``."""
    if log is None:
        writer.abort()
        return
    try:
        log.flush(writer.sync)
    except (OSError, OutputPathError):
        pass  # the last batch is redone on resume
    writer.keep_partial()
    log.close()


def _stopped_message(out_path: Path, log: Journal | None, how: str) -> str:
    if log is None:
        return f"{out_path}: merge {how}; no file was written"
    return (
        f"{out_path}: merge {how}; progress kept in {temp_path_for(out_path).name} — "
        f"`python -m lib_merge merge --resume -o {out_path}` continues it"
    )


def _absolute_recipe(recipe: Recipe) -> dict:
    from ..inputs import parse_model_ref

    models = [m if not isinstance(parse_model_ref(m), str) else str(Path(m).resolve()) for m in recipe.models]
    return recipe.replace(models=tuple(models), vae=str(Path(recipe.vae).resolve()) if recipe.vae else None).to_dict()


def single_threaded_torch() -> None:
    """Parallelism comes from running keys side by side; torch's own intra-op threads on top of
    that oversubscribe the cores (measured 10× slower on a busy 2-core machine). torch also keeps
    the last count as the default of threads created later, so whoever starts the pool must put
    the caller's count back when the pool is done (``execute`` and the soup pool do)."""
    torch.set_num_threads(1)


class _Counters:
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


def read_sources(plan: MergePlan, job: KeyJob, counters: _Counters | None = None) -> list[torch.Tensor]:
    """The job's input tensors in storage dtype (virtual inputs in fp32, made from A's tensor)."""
    tensors: list[torch.Tensor | None] = [None] * len(job.sources)
    for slot, index in enumerate(job.sources):
        source = plan.inputs[index]
        if isinstance(source, CheckpointReader):
            tensors[slot] = source.get(job.key)
            if counters:
                counters.add_read(source.infos[job.key].nbytes)
    for slot, index in enumerate(job.sources):
        source = plan.inputs[index]
        if isinstance(source, VirtualInput):
            tensors[slot] = source.make(job.key, tensors[0])  # type: ignore[arg-type]
    return tensors  # type: ignore[return-value]


Chunk = tuple[int, torch.Tensor]  # (element offset within the key, flat chunk in the output dtype)


class _ThreadBuffers(threading.local):
    """Per-thread scratch buffers of one chunk, reused for every chunk of every key, so the
    streaming path allocates nothing and its working set stays in cache."""

    def get(self, slot: int, dtype: torch.dtype, size: int = CHUNK_ELEMENTS) -> torch.Tensor:
        cache = self.__dict__.setdefault("cache", {})
        buf = cache.get((slot, dtype))
        if buf is None or buf.numel() < size:
            buf = cache[(slot, dtype)] = torch.empty(size, dtype=dtype)
        return buf


_buffers = _ThreadBuffers()


def produce_job(plan: MergePlan, job: KeyJob, counters: _Counters | None = None) -> Iterator[Chunk]:
    """Yield the output of one key as flat chunks. Each chunk is only valid until the next one is
    requested (it may live in a reused buffer): write it, don't keep it."""
    if job.action == "merge" and not job.identity and job.common_channels is None \
            and getattr(plan.method.fn, "lazy_inputs", False):
        yield from _produce_lazy(plan, job, counters)
        return
    tensors = read_sources(plan, job, counters)
    if job.action == "copy" or job.identity:
        yield from _copy_checked(plan, job, tensors[0])
        return
    ctx = KeyContext(job.key, job.block, plan.recipe.seed)
    method = plan.method
    if job.common_channels is None and method.elementwise:
        chunk_size = min(CHUNK_ELEMENTS, stream_chunk(len(tensors)))
        for offset, chunk in _stream_elementwise(method, tensors, job.out_dtype, job.params, ctx, chunk_size):
            if not all_finite(chunk):
                raise NonFiniteError(_non_finite_message(plan, job, tensors))
            yield offset, chunk
        return
    if job.common_channels is not None:
        out = _merge_common_channels(method, tensors, job, ctx)
    else:
        out = method.fn(*[t.float() for t in tensors], ctx=ctx, **job.params).to(job.out_dtype)
    if not all_finite(out):
        raise NonFiniteError(_non_finite_message(plan, job, tensors))
    yield 0, out.reshape(-1)


def compute_job(plan: MergePlan, job: KeyJob, counters: _Counters | None = None) -> torch.Tensor:
    """The whole output tensor of one key (for callers that need it in memory, e.g. live merge)."""
    out: torch.Tensor | None = None
    for offset, chunk in produce_job(plan, job, counters):
        if offset == 0 and chunk.numel() == _numel(job.shape):
            return chunk.clone().view(job.shape) if _is_scratch(chunk) else chunk.view(job.shape)
        if out is None:
            out = torch.empty(_numel(job.shape), dtype=chunk.dtype)
        out[offset: offset + chunk.numel()].copy_(chunk)
    assert out is not None
    return out.view(job.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_scratch(chunk: torch.Tensor) -> bool:
    cache = _buffers.__dict__.get("cache", {})
    ptr = chunk.untyped_storage().data_ptr()
    return any(buf.untyped_storage().data_ptr() == ptr for buf in cache.values())


def _copy_checked(plan: MergePlan, job: KeyJob, source: torch.Tensor) -> Iterator[Chunk]:
    """A key taken straight from one input (a copied key, a block at ratio 0, a baked VAE): the
    same NaN/Inf refusal as merged keys, chunk by chunk so each chunk is checked and written
    while it is in cache. Integer tensors and markers pass untouched (``all_finite``)."""
    flat = source.reshape(-1)
    cast = flat.dtype != job.out_dtype
    out_buf = _buffers.get(-1, job.out_dtype, CHUNK_ELEMENTS) if cast else None
    # a cast makes no NaN; it makes Inf only where the output's range is narrower (fp32 → fp16)
    narrowing = cast and flat.is_floating_point() and torch.finfo(job.out_dtype).max < torch.finfo(flat.dtype).max
    for start in range(0, flat.numel(), CHUNK_ELEMENTS) if flat.numel() else [0]:
        part = flat[start:start + CHUNK_ELEMENTS]
        if not all_finite(part):
            index = job.sources[0]
            raise NonFiniteError(
                f"{job.key}: NaN/Inf in input {_source_label(plan, index)}, copied unmerged into the output; "
                "that checkpoint is damaged — re-download it or leave it out of the merge"
            )
        if out_buf is None:
            yield start, part
            continue
        out = out_buf[: part.numel()]
        out.copy_(part)
        if narrowing and not all_finite(out):
            raise NonFiniteError(
                f"{job.key}: values of {_source_label(plan, job.sources[0])} exceed the range of {job.out_dtype}; "
                "use --dtype bf16 or fp32"
            )
        yield start, out


def _source_label(plan: MergePlan, index: int) -> str:
    """'A (a.safetensors)', or 'VAE (x.safetensors)' for a baked VAE (an input after the models)."""
    source = plan.inputs[index]
    if index >= len(plan.recipe.models):
        return f"VAE ({source.path.name if isinstance(source, CheckpointReader) else source})"
    return model_label(index, source)


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check via min/max: NaN propagates through both and ±Inf shows up in one of them;
    a vectorised reduction, ~40× faster than ``isfinite().all()`` on fp16 CPU tensors."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _stream_elementwise(
    method: MethodSpec, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype, params: dict, ctx: KeyContext,
    chunk_size: int = CHUNK_ELEMENTS,
) -> Iterator[Chunk]:
    """Run an elementwise method chunk by chunk through per-thread buffers. With a native kernel
    and inputs already in the output dtype, no fp32 copy of anything is made. Each call gets a
    ChunkContext whose ``offset`` lets random methods draw by absolute element index, so the
    chunk size never changes a result."""
    flats = [t.reshape(-1) for t in tensors]
    numel = flats[0].numel()
    native = method.native is not None and out_dtype in (torch.float16, torch.bfloat16) and all(
        t.dtype == out_dtype for t in tensors
    )
    out_buf = _buffers.get(-1, out_dtype, chunk_size)
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        n = stop - start
        out = out_buf[:n]
        if native:
            method.native(out, *[f[start:stop] for f in flats], **params)
        else:
            ins = []
            for slot, f in enumerate(flats):
                buf = _buffers.get(slot, torch.float32, chunk_size)[:n]
                buf.copy_(f[start:stop])
                ins.append(buf)
            chunk_ctx = ChunkContext(ctx.key, ctx.block, ctx.seed, offset=start)
            out.copy_(method.fn(*ins, ctx=chunk_ctx, **params))
        yield start, out


def _produce_lazy(plan: MergePlan, job: KeyJob, counters: _Counters | None) -> Iterator[Chunk]:
    """Whole-tensor N-model methods: the method gets one handle per input and maps them one at
    a time; its fp32 result is cast and written through a chunk buffer."""
    handles = [SourceHandle(plan, index, job.key, counters) for index in job.sources]
    ctx = KeyContext(job.key, job.block, plan.recipe.seed)
    result = plan.method.fn(*handles, ctx=ctx, **job.params).reshape(-1)
    if not all_finite(result):
        raise NonFiniteError(_non_finite_message_lazy(plan, job, handles))
    numel = result.numel()
    if job.out_dtype == torch.float32:
        yield 0, result
        return
    out_buf = _buffers.get(-1, job.out_dtype)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        out = out_buf[: stop - start]
        out.copy_(result[start:stop])
        if not all_finite(out):
            raise NonFiniteError(
                f"{job.key}: method {plan.method.name} gives values beyond the range of {job.out_dtype}; "
                "use --dtype bf16 or fp32"
            )
        yield start, out


def _non_finite_message_lazy(plan: MergePlan, job: KeyJob, handles: list[SourceHandle]) -> str:
    culprits = []
    for index, handle in zip(job.sources, handles):
        if not all_finite(handle.load()):
            culprits.append(model_label(index, plan.inputs[index]))
    if culprits:
        return (
            f"{job.key}: NaN/Inf in input {', '.join(culprits)}; that checkpoint is damaged — "
            "re-download it or leave it out of the merge"
        )
    return f"{job.key}: method {plan.method.name} produced NaN/Inf with {job.params}"


def apply_method(
    method: MethodSpec, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype, params: dict, ctx: KeyContext
) -> torch.Tensor:
    """Whole-tensor application (fp32 math, cast once)."""
    return method.fn(*[t.float() for t in tensors], ctx=ctx, **params).to(out_dtype)


def _merge_common_channels(method: MethodSpec, tensors: list[torch.Tensor], job: KeyJob, ctx: KeyContext) -> torch.Tensor:
    """Inpainting (9-channel) vs normal (4-channel) conv_in: merge the shared input channels,
    keep A's extra ones (supermerger's behaviour)."""
    c = job.common_channels
    assert c is not None
    shared = [t[:, :c].contiguous() for t in tensors]
    merged = apply_method(method, shared, torch.float32, job.params, ctx)
    a = tensors[0]
    if a.shape[1] == c:
        return merged.to(job.out_dtype)
    out = a.float().clone()
    out[:, :c] = merged
    return out.to(job.out_dtype)


def _non_finite_message(plan: MergePlan, job: KeyJob, tensors: list[torch.Tensor]) -> str:
    culprits = [
        model_label(index, plan.inputs[index])
        for index, t in zip(job.sources, tensors)
        if not all_finite(t)
    ]
    if culprits:
        return (
            f"{job.key}: NaN/Inf in input {', '.join(culprits)}; that checkpoint is damaged — "
            "re-download it or leave it out of the merge"
        )
    return (
        f"{job.key}: method {plan.method.name} produced NaN/Inf with {job.params}; "
        f"try smaller ratios or a {'wider' if job.out_dtype == torch.float16 else 'different'} output dtype"
    )
