"""Memory for N-input merges: what one key costs, how many keys may be in flight, and the
handles that let a method read N inputs one at a time.

Per key, in bytes (n = elements of the key, s = bytes per element of an input as stored):
  copy / identity          n·s                                   (A's tensor, mapped)
  elementwise (streamed)   N·n·s + (5N + 2)·chunk·4              (every input mapped, fp32 chunk buffers
                                                                 and the chunk's task-vector temporaries)
  whole-tensor task vectors  copies(N)·4·n + 2·n·s + 32 MiB     (the method's declared working set:
                           P = N − 1 task vectors in fp32 plus a few copies, see task_vector.working_copies;
                           the base and one fine-tune mapped; the chunked passes' temporaries)
  any other method         N·n·(s + 4) + 3·4·n + n·out           (inputs mapped and converted to fp32,
                           the method's temporaries, the output)
At most ``threads`` keys run at once, so the working set is bounded by threads × the largest
key; with ``max_memory`` a gate admits a key only while the estimates of the keys in flight fit
under the cap (a big key then runs alone, small ones fill the rest), and a key that alone
exceeds the cap is an error before any work starts. Page-cache pages of the inputs are not
counted: the kernel drops them under pressure.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .errors import BadParameterError, MemoryBudgetError
from .inputs import VirtualInput
from .io.reader import CheckpointReader
from .methods.task_vector import SCRATCH_BYTES

if TYPE_CHECKING:
    from .plan import KeyJob, MergePlan

GiB = 1 << 30
# Elementwise streaming: the default chunk, shrunk for many inputs so that the per-thread fp32
# buffers (one per input) stay around 16 MiB; results do not depend on it (elementwise math,
# random draws by absolute element index).
MAX_CHUNK = 1 << 18
MIN_CHUNK = 1 << 12


def stream_chunk(n_inputs: int) -> int:
    chunk = MAX_CHUNK
    while chunk > MIN_CHUNK and (n_inputs + 2) * chunk * 4 > 16 << 20:
        chunk //= 2
    return chunk


def parse_size(text: str | int | None) -> int | None:
    """'24G', '512M', '1.5GiB', '2000000000' → bytes (binary units); None/'' → None."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise BadParameterError(f"--max-memory {text!r}: write a size such as 24G, 512M or 1.5T")
    value = float(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    if value < 1 << 20:
        raise BadParameterError(f"--max-memory {text!r} is below 1 MiB; did you forget the unit (e.g. 8G)?")
    return int(value)


def format_size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1024:.0f} KiB"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _stored_bytes(plan: "MergePlan", job: "KeyJob") -> list[int]:
    sizes = []
    for index in job.sources:
        source = plan.inputs[index]
        if isinstance(source, CheckpointReader) and job.key in source.infos:
            sizes.append(torch.empty((), dtype=source.infos[job.key].torch_dtype).element_size())
        else:
            sizes.append(4)  # virtual inputs are made in fp32
    return sizes


def declared_copies(fn: Callable, count: int, params: dict) -> float:
    """A lazy method's declared fp32 copies of a key for N inputs; one whose working set depends
    on a parameter (sce's top-k selection) declares ``working_copies_with(n, params)``."""
    with_params = getattr(fn, "working_copies_with", None)
    return with_params(count, params) if with_params is not None else fn.working_copies(count)


def chunk_buffers(fn, count: int) -> int:
    """fp32 chunk buffers an elementwise method holds for ``count`` inputs: its declaration
    (``chunk_copies``), else a plain weighted sum's."""
    declared = getattr(fn, "chunk_copies", None)
    return declared(count) if declared is not None else 5 * count + 2


def job_bytes(plan: "MergePlan", job: "KeyJob") -> int:
    """Estimated peak bytes one key holds while it is processed (see the module doc)."""
    n = _numel(job.shape)
    sizes = _stored_bytes(plan, job)
    out_size = torch.empty((), dtype=job.out_dtype).element_size()
    if getattr(job, "patches", None):  # a LoRA-baked key: fp32 result + one fp32 delta + the cast output
        return n * (max(sizes) + 4 + 4 + 4 + out_size)
    if job.action == "copy" or job.identity:
        return n * max(sizes[0], out_size) + n * out_size
    count = len(job.sources)
    copies: Callable[[int], float] | None = getattr(plan.method.fn, "working_copies", None)
    if job.common_channels is not None:
        return count * n * (max(sizes) + 4) + 3 * 4 * n + n * out_size
    if plan.method.elementwise:
        # inputs mapped, and fp32 chunk buffers (a method may declare more: a task-vector chunk's
        # stack, draws, signs and masks)
        return sum(sizes) * n + chunk_buffers(plan.method.fn, count) * stream_chunk(count) * 4
    if copies is not None:
        return int(declared_copies(plan.method.fn, count, job.params) * 4 * n) + 2 * max(sizes) * n + SCRATCH_BYTES
    return count * n * (max(sizes) + 4) + 3 * 4 * n + n * out_size


@dataclass(frozen=True)
class MemoryPlan:
    threads: int
    budget: int | None
    largest_key: str
    largest_bytes: int
    bound: int  # the working set never exceeds this

    def describe(self, plan: "MergePlan") -> str:
        method = plan.method
        count = len(plan.inputs)
        copies = getattr(method.fn, "working_copies", None)
        if copies is not None:
            what = getattr(method.fn, "working_set", None) or f"{count - 1} task vectors + working buffers"
            params = next((j.params for j in plan.jobs if j.key == self.largest_key), {})
            per_key = f"{declared_copies(method.fn, count, params):g} fp32 copies of a key ({what})"
        elif method.elementwise:
            per_key = f"{count} inputs mapped + {chunk_buffers(method.fn, count)} fp32 chunks of {stream_chunk(count)} elements"
        else:
            per_key = f"{count} inputs in fp32 + temporaries"
        cap = f", capped by --max-memory {format_size(self.budget)}" if self.budget else ""
        return (
            f"plan: {method.name} over {count} models, {len(plan.jobs)} keys, {self.threads} threads; "
            f"per key {per_key}; largest key {self.largest_key} needs {format_size(self.largest_bytes)}; "
            f"working set ≤ {format_size(self.bound)}{cap}"
        )


def plan_memory(plan: "MergePlan", threads: int, budget: int | None) -> MemoryPlan:
    """The bound on the working set; raises MemoryBudgetError when one key cannot fit."""
    largest_key, largest = "", 0
    sizes = []
    for job in plan.jobs:
        need = job_bytes(plan, job)
        sizes.append(need)
        if need > largest:
            largest_key, largest = job.key, need
    sizes.sort(reverse=True)
    worst = sum(sizes[:threads])  # the `threads` biggest keys at once
    if budget is not None:
        if largest > budget:
            raise MemoryBudgetError(
                f"--max-memory {format_size(budget)} is below what key {largest_key} alone needs "
                f"({format_size(largest)} for {len(plan.inputs)} models with {plan.method.name}); "
                "raise the cap or merge fewer models"
            )
        worst = min(worst, budget)
    return MemoryPlan(threads, budget, largest_key, largest, worst)


class MemoryGate:
    """Admits keys while the sum of their estimates fits under the budget (no budget: always)."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.in_use = 0
        self._cond = threading.Condition()

    def acquire(self, need: int, cancel, tick: Callable[[], None] | None = None) -> bool:
        """Wait until ``need`` fits (or nothing else runs); False if ``cancel.is_set()`` first.
        ``tick`` is called about every 0.2 s while waiting (the engine flushes its resume file)."""
        if self.budget is None:
            return True
        while True:
            with self._cond:
                if not self.in_use or self.in_use + need <= self.budget:
                    self.in_use += need
                    return True
                if cancel.is_set():
                    return False
                self._cond.wait(0.2)
            if tick is not None:
                tick()  # outside the lock: a slow fsync must not hold up workers releasing memory

    def release(self, need: int) -> None:
        if self.budget is None:
            return
        with self._cond:
            self.in_use -= need
            self._cond.notify_all()


class SourceHandle:
    """One input's tensor for one key, mapped only while the caller holds what ``load()``
    returned — so a method can walk N inputs with one of them resident at a time."""

    __slots__ = ("_plan", "_index", "_key", "_counters", "shape", "dtype")

    def __init__(self, plan: "MergePlan", index: int, key: str, counters=None):
        self._plan = plan
        self._index = index
        self._key = key
        self._counters = counters
        source = plan.inputs[index]
        template = plan.inputs[0]
        assert isinstance(template, CheckpointReader)
        info = (source if isinstance(source, CheckpointReader) else template).infos[key]
        self.shape = info.shape
        self.dtype = info.torch_dtype if isinstance(source, CheckpointReader) else torch.float32

    def load(self) -> torch.Tensor:
        source = self._plan.inputs[self._index]
        if isinstance(source, CheckpointReader):
            if self._counters is not None:
                self._counters.add_read(source.infos[self._key].nbytes)
            return source.get(self._key)
        assert isinstance(source, VirtualInput)
        template = self._plan.inputs[0]
        assert isinstance(template, CheckpointReader)
        if self._counters is not None and source.kind == "noise":
            self._counters.add_read(template.infos[self._key].nbytes)
        return source.make(self._key, template.get(self._key))
