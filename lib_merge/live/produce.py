"""Producing merged values: one key's merged tensor computed straight into a flat output (the live
tensor or a scratch buffer), with the streaming engine's own kernels so the bits equal the saved
file's, and work dealt to a few threads. Knows nothing of originals or of what changed.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, MutableMapping, Sequence

import torch

from ..engine.finite import all_finite
from ..engine.produce import produce_job, read_sources
from ..errors import NonFiniteError
from ..io.reader import CheckpointReader
from ..plan import KeyJob, MergePlan

# Chunk of the in-place kernel: big enough that Python's per-chunk work is negligible next to the
# memory traffic, small enough that the NaN check re-reads the chunk from cache (2 MB in fp16).
LIVE_CHUNK = 1 << 20
# Inputs up to this magnitude cannot overflow the fp32 arithmetic of a bounded kernel (fp32 max 3.4e38).
_SAFE_MAGNITUDE = 1e30
# A key's fixed cost in elements' worth of work, for dealing keys to threads.
_PER_KEY_COST = 1 << 14
_ELEMENTS_PER_THREAD = 1 << 22


class _ScratchBuffers(threading.local):
    """One growing buffer per thread and dtype for the values handed to ``target.write``: host
    writes copy them, so the next key reuses the memory instead of allocating (and page-faulting)
    a fresh tensor. Holds at most the largest key per live-merge thread."""

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.__dict__.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self.__dict__[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


scratch = _ScratchBuffers()


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def spread(pool: ThreadPoolExecutor | None, threads: int, fn: Callable[[Any], None], items: Sequence,
           sizes: Sequence[int]) -> None:
    """``fn`` over ``items`` on the pool: one task per thread, items dealt largest first to the
    least-loaded thread (a block is a few big convolutions and many small vectors; a task per
    item would cost more in hand-offs than the small ones take)."""
    # A thread per _ELEMENTS_PER_THREAD: below that, handing work over costs more than it saves.
    width = min(threads, len(items), sum(sizes) // _ELEMENTS_PER_THREAD)
    if pool is None or width < 2:
        for item in items:
            fn(item)
        return
    lanes: list[list] = [[] for _ in range(width)]
    loads = [0] * len(lanes)
    for size, item in sorted(zip(sizes, items), key=lambda pair: -pair[0]):
        lane = loads.index(min(loads))
        lanes[lane].append(item)
        loads[lane] += size + _PER_KEY_COST
    for done in pool.map(lambda lane: [fn(item) for item in lane], lanes):
        del done  # re-raises a worker's exception here


def merge_into(plan: MergePlan, job: KeyJob, out: torch.Tensor, safe_inputs: MutableMapping) -> None:
    """The merged values of one key into the flat tensor ``out`` (cast on the way in).
    ``safe_inputs`` remembers, per (input, key), whether ``_inputs_safe`` found it safe."""
    if out.dtype == job.out_dtype and _native_into(plan, job, out, safe_inputs):
        return
    for offset, chunk in produce_job(plan, job):
        out[offset: offset + chunk.numel()].copy_(chunk.view(-1))


def _native_into(plan: MergePlan, job: KeyJob, out: torch.Tensor, safe_inputs: MutableMapping) -> bool:
    """The engine's native elementwise kernel (same op, same inputs, hence the same bits as the
    file) run straight into ``out`` chunk by chunk; False when the engine would take another
    path for this key. The engine's NaN/Inf check runs on every chunk unless the method is
    bounded for these parameters and the inputs were found finite (once per session)."""
    method = plan.method
    if job.identity or job.patches or job.common_channels is not None or not method.elementwise \
            or method.native is None:
        return False
    if job.out_dtype not in (torch.float16, torch.bfloat16):
        return False
    tensors = read_sources(plan, job)
    if not all(t.dtype == job.out_dtype for t in tensors):
        return False
    check = not (method.bounded is not None and method.bounded(**job.params)
                 and _inputs_safe(plan, job, tensors, safe_inputs))
    flats = [t.reshape(-1) for t in tensors]
    if not check:  # one call: chunks only exist to re-read the output from cache for the check
        method.native(out, *flats, **job.params)
        return True
    for start in range(0, out.numel(), LIVE_CHUNK):
        stop = min(start + LIVE_CHUNK, out.numel())
        chunk = out[start:stop]
        method.native(chunk, *[f[start:stop] for f in flats], **job.params)
        if not all_finite(chunk):
            bad = [plan.inputs[i] for i, t in zip(job.sources, tensors) if not all_finite(t)]
            names = ", ".join(getattr(r, "name", str(r)) for r in bad)
            raise NonFiniteError(
                f"{job.key}: NaN/Inf in input {names}; that checkpoint is damaged" if bad else
                f"{job.key}: method {method.name} produced NaN/Inf with {job.params}"
            )
    return True


def _inputs_safe(plan: MergePlan, job: KeyJob, tensors: Sequence[torch.Tensor], safe_inputs: MutableMapping) -> bool:
    """Every input of the key is a file tensor (or A's original of it), finite and far enough
    from fp32's limit that the kernel's fp32 arithmetic cannot overflow. Measured once per
    input and key: the mapped files and A's originals do not change during a session."""
    for index, tensor in zip(job.sources, tensors):
        if not isinstance(plan.inputs[index], CheckpointReader):
            return False
        safe = safe_inputs.get((index, job.key))
        if safe is None:
            safe = True
            if tensor.numel():
                low, high = (float(v) for v in torch.aminmax(tensor))
                safe = math.isfinite(low) and math.isfinite(high) and max(-low, high) <= _SAFE_MAGNITUDE
            safe_inputs[(index, job.key)] = safe
        if not safe:
            return False
    return True
