"""One key of a plan → its output as flat chunks: read → fp32 → method → cast, checked for NaN/Inf.

Elementwise methods are streamed through small per-thread buffers, so the merged tensor never
exists in memory. On this machine class memory bandwidth, not arithmetic, is the limit: every
full-size pass over a tensor (a fresh output, a NaN scan, an fp32 copy) costs about as much as
reading it, so chunks that stay in cache are what brings a merge close to the I/O floor. The
consumer (the writer, or ``compute_job`` for a tensor in memory) takes each chunk before the
next one is made.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import NonFiniteError
from ..inputs import VirtualInput
from ..io.dtypes import cast, copy_cast
from ..io.reader import CheckpointReader
from ..many import SourceHandle, stream_chunk
from ..methods.registry import KeyContext, MethodSpec
from ..methods.sparsify import ChunkContext
from ..plan import KeyJob, MergePlan
from .finite import all_finite, non_finite_message, non_finite_message_lazy, source_label

if TYPE_CHECKING:
    from .pool import Counters

# Elementwise methods run over flat chunks this size: the fp32 working set of one chunk stays in
# cache instead of materialising full-size fp32 temporaries (several times faster on 2 cores).
CHUNK_ELEMENTS = 1 << 18

Chunk = tuple[int, torch.Tensor]  # (element offset within the key, flat chunk in the output dtype)


def read_sources(plan: MergePlan, job: KeyJob, counters: Counters | None = None) -> list[torch.Tensor]:
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


def produce_job(plan: MergePlan, job: KeyJob, counters: Counters | None = None) -> Iterator[Chunk]:
    """Yield the output of one key as flat chunks. Each chunk is only valid until the next one is
    requested (it may live in a reused buffer): write it, don't keep it."""
    if job.patches:
        yield from _produce_patched(plan, job, counters)
        return
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
                raise NonFiniteError(non_finite_message(plan, job, tensors))
            yield offset, chunk
        return
    if job.common_channels is not None:
        out = _merge_common_channels(method, tensors, job, ctx)
    else:
        out = cast(method.fn(*[t.float() for t in tensors], ctx=ctx, **job.params), job.out_dtype)
    if not all_finite(out):
        raise NonFiniteError(non_finite_message(plan, job, tensors))
    yield 0, out.reshape(-1)


def _produce_patched(plan: MergePlan, job: KeyJob, counters: Counters | None) -> Iterator[Chunk]:
    """A key a LoRA touches: the method's result (or A's tensor) in fp32, the LoRA deltas added,
    then one rounding to the output dtype. Holds the key in fp32 (the planner counts it)."""
    from ..lora.bake import apply_patches

    if job.action == "merge" and not job.identity:
        full = compute_job(plan, replace(job, patches=None, out_dtype=torch.float32), counters).clone()
    else:
        source = read_sources(plan, job, counters)[0]
        if not all_finite(source):
            raise NonFiniteError(f"{job.key}: NaN/Inf in input {source_label(plan, job.sources[0])}; "
                                 "that checkpoint is damaged — re-download it or leave it out of the merge")
        full = source.float().clone() if source.dtype == torch.float32 else source.float()
    apply_patches(full, job.patches)
    if not all_finite(full):
        raise NonFiniteError(f"{job.key}: baking the LoRA gives NaN/Inf (a damaged LoRA, or a strength far too large)")
    out = cast(full, job.out_dtype)
    if not all_finite(out):
        raise NonFiniteError(f"{job.key}: the LoRA bake exceeds the range of {job.out_dtype}; use --dtype bf16 or fp32")
    yield 0, out.reshape(-1)


def compute_job(plan: MergePlan, job: KeyJob, counters: Counters | None = None) -> torch.Tensor:
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
                f"{job.key}: NaN/Inf in input {source_label(plan, index)}, copied unmerged into the output; "
                "that checkpoint is damaged — re-download it or leave it out of the merge"
            )
        if out_buf is None:
            yield start, part
            continue
        out = out_buf[: part.numel()]
        copy_cast(out, part)
        if narrowing and not all_finite(out):
            raise NonFiniteError(
                f"{job.key}: values of {source_label(plan, job.sources[0])} exceed the range of {job.out_dtype}; "
                "use --dtype bf16 or fp32"
            )
        yield start, out


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
            copy_cast(out, method.fn(*ins, ctx=chunk_ctx, **params))
        yield start, out


def _produce_lazy(plan: MergePlan, job: KeyJob, counters: Counters | None) -> Iterator[Chunk]:
    """Whole-tensor N-model methods: the method gets one handle per input and maps them one at
    a time; its fp32 result is cast and written through a chunk buffer."""
    handles = [SourceHandle(plan, index, job.key, counters) for index in job.sources]
    ctx = KeyContext(job.key, job.block, plan.recipe.seed)
    result = plan.method.fn(*handles, ctx=ctx, **job.params).reshape(-1)
    if not all_finite(result):
        raise NonFiniteError(non_finite_message_lazy(plan, job, handles))
    numel = result.numel()
    if job.out_dtype == torch.float32:
        yield 0, result
        return
    out_buf = _buffers.get(-1, job.out_dtype)
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        out = out_buf[: stop - start]
        copy_cast(out, result[start:stop])
        if not all_finite(out):
            raise NonFiniteError(
                f"{job.key}: method {plan.method.name} gives values beyond the range of {job.out_dtype}; "
                "use --dtype bf16 or fp32"
            )
        yield start, out


def apply_method(
    method: MethodSpec, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype, params: dict, ctx: KeyContext
) -> torch.Tensor:
    """Whole-tensor application (fp32 math, cast once)."""
    return cast(method.fn(*[t.float() for t in tensors], ctx=ctx, **params), out_dtype)


def _merge_common_channels(method: MethodSpec, tensors: list[torch.Tensor], job: KeyJob, ctx: KeyContext) -> torch.Tensor:
    """Inpainting (9-channel) vs normal (4-channel) conv_in: merge the shared input channels,
    keep A's extra ones (supermerger's behaviour)."""
    c = job.common_channels
    assert c is not None
    shared = [t[:, :c].contiguous() for t in tensors]
    merged = apply_method(method, shared, torch.float32, job.params, ctx)
    a = tensors[0]
    if a.shape[1] == c:
        return cast(merged, job.out_dtype)
    out = a.float().clone()
    out[:, :c] = merged
    return cast(out, job.out_dtype)
