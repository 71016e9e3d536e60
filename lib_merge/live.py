"""Live merge: patch the parameters of a loaded torch model in place, block by block, and put
model A back bit-exactly.

The loaded model holds model A. ``LiveMerge.apply(recipe)`` plans the recipe with the same
planner as the streaming engine and, for every block whose merge changed since the last apply
(its weight, the method, a model, a parameter), computes the merged tensors with the engine's own
kernels (``produce_job``; the native elementwise kernel straight into the tensor)
in the recipe's output dtype, exactly as the saved file holds them, and copies them into the model
in the model's dtype and on its device — so the model holds what loading the saved file would give
it. Unchanged blocks are not touched (not even rewritten with equal values).

A's original value of a key is copied to CPU the first time the key is patched (from the LoRA
backup when a LoRA is applied); ``restore()`` writes those copies back, so the model returns to A
bit-exactly. Originals that are A's file tensor cast to the model's dtype (an upcast model) are
never copied, and with a cache limit neither are those equal to the file (both checked once, at
capture): restore re-reads them from the file. Nothing is placed on the model's device except the tensor
being written. Inputs are mapped once per session; A's bytes come from the RAM originals where
they equal the file.

How values reach the model is the ``LiveTarget``'s job: the plain target copies in place; host
adapters (``lib_merge.webui.board.host_a1111`` / ``host_forge``) write through the WebUI's own paths so
LoRA backups stay consistent. Core module: imports only torch and lib_merge.
"""
from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .arch import detect_architecture
from .engine.finite import all_finite
from .engine.produce import produce_job, read_sources
from .errors import MergeError, NonFiniteError
from .inputs import VirtualInput, parse_model_ref
from .io.dtypes import output_dtype
from .io.reader import CheckpointReader, SafetensorsReader, open_checkpoint
from .plan import KeyJob, MergePlan, block_settings, plan_merge
from .recipe import Recipe
from .torch_threads import on_one_torch_thread



class LiveMergeError(MergeError):
    """The live merge cannot run (model changed or unsupported, A is not the loaded model...)."""


def _write_context(t: torch.Tensor):
    # Forge loads its models under inference_mode; in-place writes to inference tensors are only
    # allowed inside it, and writes to normal tensors must not record autograd history.
    return torch.inference_mode() if t.is_inference() else torch.no_grad()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` (cast and device move included) in the right grad mode."""
    with _write_context(dst):
        dst.copy_(src)


def get_attr(root: torch.nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class WriteItem:
    key: str  # checkpoint key, e.g. model.diffusion_model.input_blocks.1.0.in_layers.0.weight
    value: torch.Tensor  # on CPU, in the module's dtype (or fp32 for exotic storage)
    original: bool  # True when ``value`` is A's original (a restore)


class LiveTarget:
    """Maps checkpoint keys onto a loaded model and writes values into it.

    ``modules`` maps a checkpoint-key prefix to the module holding those keys, e.g.
    ``{"model.diffusion_model.": unet}``. Parameters are resolved by name at every use, because
    hosts may replace parameter objects (device swaps, LoRA) between two patches.
    """

    label = "model"

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self.modules = dict(modules)

    # -- identity and checks ----------------------------------------------------------------------
    def identity(self) -> tuple:
        """Changes when the host swaps the model object (another checkpoint, a reload)."""
        return tuple((prefix, id(module)) for prefix, module in self.modules.items())

    def check(self) -> None:
        """Raise ``LiveMergeError`` with one clear sentence when the model cannot be patched."""

    # -- lookup -----------------------------------------------------------------------------------
    def split(self, key: str) -> tuple[torch.nn.Module, str] | None:
        for prefix, module in self.modules.items():
            if key.startswith(prefix):
                return module, key[len(prefix):]
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every patchable tensor by checkpoint key (parameters and persistent buffers)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.modules.items():
            for name, t in module.state_dict(keep_vars=True).items():
                out[prefix + name] = t
        return out

    def current(self, key: str) -> torch.Tensor:
        found = self.split(key)
        if found is None:
            raise KeyError(key)
        module, name = found
        return get_attr(module, name)

    def original(self, key: str) -> torch.Tensor:
        """The value that represents A for ``key`` right now (hosts consult LoRA backups)."""
        return self.current(key)

    # -- writing ----------------------------------------------------------------------------------
    def direct(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The live tensor itself when merged chunks may be streamed straight into it (CPU,
        contiguous; chunks in ``dtype`` are cast on the way in); None sends values through
        ``write``. Host targets that must write through the WebUI's own path return None."""
        if type(self).write is not LiveTarget.write:
            return None
        t = self.current(key)
        if t.device.type == "cpu" and t.is_floating_point() and t.is_contiguous():
            return t
        return None

    def write(self, items: Sequence[WriteItem]) -> None:
        """Copy the values into the model. Called from several threads at once, one key per call
        in general; the caller reuses the values' memory once it returns, so copy, never keep."""
        for item in items:
            copy_into(self.current(item.key), item.value)

    def flush(self) -> None:
        """Called once after the writes of an apply or a restore: finish what is best done once."""


@dataclass
class LiveReport:
    """What one apply/restore did."""

    blocks: list[str] = field(default_factory=list)  # blocks whose keys were written, in order
    keys: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped_keys: int = 0  # keys of the recipe that are not in the loaded model (applied on save)
    save_only_blocks: list[str] = field(default_factory=list)  # blocks merged in the file but not previewed
    save_only_parts: list[str] = field(default_factory=list)  # what of them: "text encoders", "VAE"…
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.keys:
            text = "nothing to patch: the model already matches"
        else:
            blocks = ", ".join(self.blocks[:8]) + (f" (+{len(self.blocks) - 8} more)" if len(self.blocks) > 8 else "")
            text = f"patched {self.keys} tensors in {len(self.blocks)} block(s) [{blocks}] in {self.seconds * 1000:.0f} ms"
        if self.save_only_blocks:
            parts = " and ".join(sorted(self.save_only_parts, key=lambda part: part == "VAE")) or "some keys"
            text += (f"; {', '.join(self.save_only_blocks)} merges the {parts} into the saved file only — the "
                     f"preview keeps A's (set {'/'.join(self.save_only_blocks)} to 0 to preview exactly what Save writes)")
        return text


def _file_identity(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


class LiveMerge:
    """Runtime merge into the model loaded from ``model_a`` (see the module docstring).

    ``cache_limit_bytes`` bounds the RAM used for A's originals (None = no limit); originals
    beyond it are re-read from A's file when they are bit-identical to it, and kept otherwise
    (correctness first). All methods are thread-safe; the caller serialises against generation.
    """

    def __init__(
        self,
        target: LiveTarget,
        model_a: str | os.PathLike[str],
        *,
        cache_limit_bytes: int | None = None,
        threads: int | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.target = target
        self.model_a = Path(model_a)
        if not self.model_a.is_file():
            raise LiveMergeError(f"{self.model_a}: model A's file is missing; the live merge needs it to plan and restore")
        self.cache_limit_bytes = cache_limit_bytes
        self._log = log or (lambda message: None)
        self._lock = threading.RLock()
        self._identity = target.identity()
        self._originals: dict[str, torch.Tensor | None] = {}  # None: re-read from A's file
        self._cached_bytes = 0
        self._applied: dict[str, tuple] = {}  # key -> signature of the merge it holds (absent: A)
        self._applied_block: dict[str, str] = {}
        self._readers: dict[str, CheckpointReader] = {}
        self._plan_cache: tuple[tuple, MergePlan] | None = None
        self._dirty: set[str] = set()  # keys being written by the current apply (rolled back on failure)
        self._same_as_file: set[str] = set()  # originals bit-identical to A's file
        self._safe_inputs: dict[tuple[int, str], bool] = {}  # (input, key) -> finite, no overflow risk
        self._block_state: dict[str, tuple | None] = {}  # block -> signature it holds (absent: A)
        self._jobs_by_block: dict[str, list[tuple[KeyJob, torch.dtype]]] = {}
        self._skipped = 0
        self._skipped_blocks: dict[str, set[str]] = {}  # block -> parts of it the loaded model lacks
        self._capture_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # One thread by default: the kernels are memory-bound and torch's own intra-op threads
        # already split every big tensor; worker threads on top (each with torch's threads) only
        # oversubscribe the cores and contend for the GIL over the many small tensors
        # (SD1.5, 2 cores: one block 4.3 ms alone vs 7.9 ms with 2 workers).
        self.threads = threads or 1
        self._model_ids: tuple = ()
        self._layout_cache: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self.recipe: Recipe | None = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def is_patched(self) -> bool:
        return bool(self._applied)

    @property
    def patched_blocks(self) -> list[str]:
        seen: dict[str, None] = {}
        for key in self._applied:
            seen.setdefault(self._applied_block[key], None)
        return list(seen)

    @property
    def original_bytes(self) -> int:
        return self._cached_bytes

    def matches(self, target: LiveTarget) -> bool:
        return target.identity() == self._identity

    def _reader(self, path: str) -> CheckpointReader:
        key = str(Path(path).resolve())
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = MappedReader.open(path)
        return reader

    def _inputs(self, recipe: Recipe) -> list[CheckpointReader | VirtualInput]:
        inputs: list[CheckpointReader | VirtualInput] = []
        for i, ref in enumerate(recipe.models):
            parsed = parse_model_ref(ref)
            if isinstance(parsed, VirtualInput):
                inputs.append(parsed)
            elif i == 0:
                inputs.append(_ModelAReader(self._reader(parsed), self))
            else:
                inputs.append(self._reader(parsed))
        return inputs

    def _check_a(self, recipe: Recipe) -> None:
        a = recipe.models[0] if recipe.models else ""
        parsed = parse_model_ref(a)
        same = False
        if isinstance(parsed, str):
            try:
                same = os.path.samefile(parsed, self.model_a)
            except OSError:
                same = False
        if not same:
            raise LiveMergeError(
                f"live preview merges into the loaded model, so model A must be the loaded checkpoint "
                f"{self.model_a.name}; the recipe's A is {Path(str(a)).name or a!r}. Pick the loaded model as A "
                "(or load A in the WebUI first)"
            )

    def _check_target(self) -> None:
        if self.target.identity() != self._identity:
            raise LiveMergeError(
                "the loaded model changed since the live merge started (another checkpoint or a reload); "
                "the live state was dropped — apply again"
            )
        self.target.check()

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, recipe: Recipe) -> MergePlan:
        """The planner's plan for this model set / method / parameters / seed (cached: a change of
        α, β or block weights re-derives only the per-block values, see ``block_parameters``;
        planning a full SDXL header costs more than patching a block)."""
        files = tuple(_file_identity(Path(m)) for m in recipe.models if isinstance(parse_model_ref(m), str))
        skeleton = (recipe.replace(alpha=None, beta=None, weights=None, beta_weights=None), files)
        cached = self._plan_cache
        if cached is None or cached[0] != skeleton:
            if cached is not None and cached[0][1] != files:  # a file changed on disk: map it anew
                self._close_readers()
            plan = plan_merge(recipe, self._inputs(recipe))
            self._plan_cache = (skeleton, plan)
            self._safe_inputs.clear()
            self._model_ids = tuple(
                ref.spec if isinstance(ref, VirtualInput) else _file_identity(ref.path) for ref in plan.inputs
            )
            layout = self._layout()
            by_block: dict[str, list[tuple[KeyJob, torch.dtype]]] = {}
            skipped = 0
            skipped_blocks: dict[str, set[str]] = {}
            for job in plan.jobs:
                if job.action != "merge":
                    continue
                found = layout.get(job.key)
                if found is None or found[0] != tuple(job.shape):
                    skipped += 1  # not in the loaded model (VAE, text encoders): merged on save only
                    skipped_blocks.setdefault(job.block, set()).add(_part_of(job.key))
                    continue
                # The recipe's output dtype, as in the saved file: the model then holds exactly
                # what loading that file would give it (cast on write when its dtype differs).
                by_block.setdefault(job.block, []).append((job, output_dtype(recipe.dtype)))
            self._jobs_by_block, self._skipped, self._skipped_blocks = by_block, skipped, skipped_blocks
            return plan
        return cached[1]

    def _block_signature(self, plan: MergePlan, params: dict, identity: bool, sources: tuple) -> tuple | None:
        """What a block holds after this recipe: None for A, else everything its values depend on."""
        if identity:
            return None
        items = tuple(sorted((k, repr(v)) for k, v in params.items()))
        return (plan.method.name, self._model_ids, plan.recipe.seed, items, sources)

    def _layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._layout_cache is None:
            self._layout_cache = {k: (tuple(t.shape), t.dtype) for k, t in self.target.tensors().items()}
        return self._layout_cache

    # -- originals --------------------------------------------------------------------------------
    def _capture(self, key: str) -> None:
        """Keep A's value of ``key`` for ``restore``. Not kept when it is A's file tensor cast to the
        model's dtype (hosts that upcast, e.g. ``--no-half``): restore re-reads the file and the
        write casts it the same way, so the same bits come back without a RAM copy. Values
        bit-identical to the file are kept while they fit the cache limit (merges then read A's
        bytes from RAM); anything else is always kept."""
        if key in self._originals:
            return
        live = self.target.original(key).detach()
        # Compared where it lies and copied only if kept: Forge's weights are inference tensors,
        # and copying each before finding it equal to the file cost a third of Forge's first patch.
        borrowed = live.device.type == "cpu"
        value = live if borrowed else live.to("cpu", copy=True)
        match = self._file_match(key, value)
        if match == "cast":
            self._originals[key] = None
            return
        nbytes = value.numel() * value.element_size()
        limit = self.cache_limit_bytes
        with self._capture_lock:
            over = limit is not None and self._cached_bytes + nbytes > limit
            if not over or match != "same":
                self._cached_bytes += nbytes
        if over and match == "same":
            self._originals[key] = None
            return
        # clone() outside inference mode also turns an inference tensor into a normal one
        self._originals[key] = value.clone() if borrowed or value.is_inference() else value
        if match == "same":
            self._same_as_file.add(key)  # merges may read A's bytes from RAM instead of the file

    def _file_match(self, key: str, value: torch.Tensor) -> str | None:
        """"same" when A's file holds exactly these bytes, "cast" when A's file tensor cast to
        ``value``'s dtype gives exactly these bits, else None."""
        try:
            reader = self._reader(str(self.model_a))
        except MergeError:
            return None
        info = reader.infos.get(key)
        if info is None or info.shape != tuple(value.shape):
            return None
        stored = reader.get(key)
        if stored.dtype == value.dtype:
            return "same" if _same_bits(stored, value) else None
        if not (stored.is_floating_point() and value.is_floating_point()):
            return None
        # Cast a chunk at a time into a reused buffer: a whole-tensor cast would allocate (and
        # page-fault) as much fresh memory as the model holds, once per session.
        flat_stored, flat_value = stored.reshape(-1), value.reshape(-1)
        buffer = _scratch.get(value.dtype, min(LIVE_CHUNK, flat_value.numel()))
        for start in range(0, flat_value.numel(), LIVE_CHUNK):
            stop = min(start + LIVE_CHUNK, flat_value.numel())
            cast = buffer[: stop - start]
            cast.copy_(flat_stored[start:stop])
            if not _same_bits(cast, flat_value[start:stop]):
                return None
        return "cast"

    def _original_value(self, key: str) -> torch.Tensor:
        value = self._originals[key]
        if value is None:
            value = self._reader(str(self.model_a)).get(key)  # every write path copies it
        return value

    # -- apply / restore --------------------------------------------------------------------------
    def apply(self, recipe: Recipe) -> LiveReport:
        """Bring the model to ``recipe``, writing only keys whose merge changed. On any error the
        model is restored to A (never left half-patched) and the error re-raised. Runs on the
        one-torch-thread worker (``torch_threads``): with torch's two threads on the busy 2-core
        VM the real A1111's first SD1.5 patch took 59 s and an IN04 move 0.26-0.96 s; with one,
        9.3 s and 16-65 ms (same process, minutes apart)."""
        return on_one_torch_thread(self._apply, recipe)

    def _apply(self, recipe: Recipe) -> LiveReport:
        with self._lock:
            started = time.perf_counter()
            self._check_a(recipe)
            self._check_target()
            plan = self._plan(recipe)
            per_block, _ = block_parameters(plan, recipe)
            report = LiveReport(warnings=list(plan.warnings), skipped_keys=self._skipped)
            # Blocks whose keys the loaded model lacks and whose merge is not A: the file differs there.
            report.save_only_blocks = sorted(b for b in self._skipped_blocks if b in per_block and not per_block[b][1])
            report.save_only_parts = sorted({part for b in report.save_only_blocks for part in self._skipped_blocks[b]})
            work: list[tuple[KeyJob, tuple | None]] = []
            block_sigs: dict[str, tuple | None] = {}
            for block, jobs in self._jobs_by_block.items():
                params, identity, sources = per_block[block]
                block_sig = self._block_signature(plan, params, identity, sources)
                block_sigs[block] = block_sig
                if block_sig == self._block_state.get(block) and not (self._dirty and any(j.key in self._dirty for j, _ in jobs)):
                    continue  # the block already holds exactly this: not even rewritten
                for job, dtype in jobs:
                    signature = None if block_sig is None else (block_sig, job.common_channels, str(dtype))
                    if signature != self._applied.get(job.key):
                        work.append((KeyJob(job.key, job.action, block, job.shape, dtype, dict(params), sources,
                                            identity, job.common_channels), signature))
            try:
                self._run(plan, work, report)
            except BaseException as exc:
                try:
                    self._restore_all()
                    note = "the model was restored to A"
                except BaseException as again:  # the model itself is gone: nothing left to protect
                    self._forget()
                    note = f"restoring A failed too ({again}); the live state was dropped"
                if isinstance(exc, MergeError):
                    raise LiveMergeError(f"live merge failed: {exc}; {note}") from exc
                raise
            self._block_state.update(block_sigs)
            self.recipe = recipe
            report.seconds = time.perf_counter() - started
            return report

    def _run(self, plan: MergePlan, work: list, report: LiveReport) -> None:
        # Block by block, so a failure can be rolled back. All of a block's originals are taken
        # before any of its keys is written (a host write may drop the LoRA backups of a module);
        # then each key is merged and written on its own, on a few threads, largest keys first.
        by_block: dict[str, list] = {}
        for item in work:
            by_block.setdefault(item[0].block, []).append(item)
        pool = self._executor() if len(work) > 1 else None
        for block, items in by_block.items():
            sizes = [_numel(job.shape) for job, _ in items]
            self._spread(pool, lambda item: self._capture(item[0].key), items, sizes)
            self._spread(pool, lambda item: self._produce(plan, *item), items, sizes)
            for job, signature in items:
                if signature is None:
                    self._applied.pop(job.key, None)
                    self._applied_block.pop(job.key, None)
                else:
                    self._applied[job.key] = signature
                    self._applied_block[job.key] = block
                self._dirty.discard(job.key)
                report.keys += 1
                report.bytes += _numel(job.shape) * torch.empty((), dtype=job.out_dtype).element_size()
            report.blocks.append(block)
        self.target.flush()

    def _spread(self, pool: ThreadPoolExecutor | None, fn: Callable[[Any], None], items: Sequence, sizes: Sequence[int]) -> None:
        """``fn`` over ``items`` on the pool: one task per thread, items dealt largest first to the
        least-loaded thread (a block is a few big convolutions and many small vectors; a task per
        item would cost more in hand-offs than the small ones take)."""
        # A thread per _ELEMENTS_PER_THREAD: below that, handing work over costs more than it saves.
        width = min(self.threads, len(items), sum(sizes) // _ELEMENTS_PER_THREAD)
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

    def _produce(self, plan: MergePlan, job: KeyJob, signature: tuple | None) -> None:
        """One key into the model: streamed straight into its tensor (plain CPU targets), or into
        this thread's scratch buffer handed to ``target.write`` (which copies it)."""
        direct = self.target.direct(job.key, job.out_dtype)
        self._dirty.add(job.key)  # from here on a failure must put A back into this key
        if signature is None:
            value = self._original_value(job.key)
            if direct is None:
                self.target.write([WriteItem(job.key, value, True)])
            else:
                copy_into(direct, value)
            return
        if direct is not None:
            with _write_context(direct):
                self._merge_into(plan, job, direct.view(-1))
            return
        out = _scratch.get(job.out_dtype, _numel(job.shape))
        self._merge_into(plan, job, out)
        self.target.write([WriteItem(job.key, out.view(job.shape), False)])

    def _merge_into(self, plan: MergePlan, job: KeyJob, out: torch.Tensor) -> None:
        """The merged values of one key into the flat tensor ``out`` (cast on the way in)."""
        if out.dtype == job.out_dtype and self._native_into(plan, job, out):
            return
        for offset, chunk in produce_job(plan, job):
            out[offset: offset + chunk.numel()].copy_(chunk.view(-1))

    def _native_into(self, plan: MergePlan, job: KeyJob, out: torch.Tensor) -> bool:
        """The engine's native elementwise kernel (same op, same inputs, hence the same bits as the
        file) run straight into ``out`` chunk by chunk; False when the engine would take another
        path for this key. The engine's NaN/Inf check runs on every chunk unless the method is
        bounded for these parameters and the inputs were found finite (once per session)."""
        method = plan.method
        if job.identity or job.common_channels is not None or not method.elementwise or method.native is None:
            return False
        if job.out_dtype not in (torch.float16, torch.bfloat16):
            return False
        tensors = read_sources(plan, job)
        if not all(t.dtype == job.out_dtype for t in tensors):
            return False
        check = not (method.bounded is not None and method.bounded(**job.params) and self._inputs_safe(plan, job, tensors))
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

    def _inputs_safe(self, plan: MergePlan, job: KeyJob, tensors: Sequence[torch.Tensor]) -> bool:
        """Every input of the key is a file tensor (or A's original of it), finite and far enough
        from fp32's limit that the kernel's fp32 arithmetic cannot overflow. Measured once per
        input and key: the mapped files and A's originals do not change during a session."""
        for index, tensor in zip(job.sources, tensors):
            if not isinstance(plan.inputs[index], CheckpointReader):
                return False
            safe = self._safe_inputs.get((index, job.key))
            if safe is None:
                safe = True
                if tensor.numel():
                    low, high = (float(v) for v in torch.aminmax(tensor))
                    safe = math.isfinite(low) and math.isfinite(high) and max(-low, high) <= _SAFE_MAGNITUDE
                self._safe_inputs[(index, job.key)] = safe
            if not safe:
                return False
        return True

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # No torch.set_num_threads in the workers: torch keeps that count process-wide for
            # every thread initialised later, so the host's generation threads would inherit it.
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lib_merge_live")
        return self._pool

    def restore(self) -> LiveReport:
        """Write A's originals back into every patched key (bit-exact), on the same worker as apply."""
        return on_one_torch_thread(self._restore)

    def _restore(self) -> LiveReport:
        with self._lock:
            started = time.perf_counter()
            if self._applied and self.target.identity() != self._identity:
                # The host replaced the model: the patched object is gone, nothing to write back.
                self._forget()
                return LiveReport()
            try:
                if self._applied:
                    self.target.check()
            except LiveMergeError as exc:
                if "unloaded" in str(exc) or "gone" in str(exc):
                    self._forget()  # the weights are gone: nothing left to restore
                    return LiveReport(warnings=[str(exc)])
                raise
            report = self._restore_all()
            report.seconds = time.perf_counter() - started
            return report

    def _restore_all(self) -> LiveReport:
        report = LiveReport()
        keys = list(self._applied) + [k for k in self._dirty if k not in self._applied and k in self._originals]
        by_block: dict[str, list[str]] = {}
        for key in keys:
            by_block.setdefault(self._applied_block.get(key, "?"), []).append(key)
        pool = self._executor() if len(keys) > 1 else None

        def put_back(key: str) -> None:
            value = self._original_value(key)
            direct = self.target.direct(key, value.dtype)
            if direct is None:
                self.target.write([WriteItem(key, value, True)])
            else:
                copy_into(direct, value)

        for block, block_keys in by_block.items():
            sizes = [self._layout().get(k, ((0,), None))[0] for k in block_keys]
            self._spread(pool, put_back, block_keys, [_numel(shape) for shape in sizes])
            for k in block_keys:
                value = self._originals.get(k)
                self._applied.pop(k, None)
                self._applied_block.pop(k, None)
                self._dirty.discard(k)
                report.keys += 1
                report.bytes += value.numel() * value.element_size() if value is not None else 0
            report.blocks.append(block)
        self.target.flush()
        self._block_state.clear()
        self.recipe = None
        return report

    def _forget(self) -> None:
        self._applied.clear()
        self._applied_block.clear()
        self._block_state.clear()
        self._dirty.clear()
        self.recipe = None

    def holds_patch(self, keys: int = 8, elements: int = 1024) -> bool:
        """Whether the model still holds the patch, after a host said it loaded weights into the
        same model object: a few patched keys are compared with A's originals. (A1111 announces a
        VAE reload like a checkpoint load; a real reload from A's file makes them A again.)"""
        with self._lock:
            for key in list(self._applied)[:keys]:
                try:
                    now = self.target.current(key).detach().reshape(-1)[:elements].to("cpu")
                except (AttributeError, KeyError, RuntimeError):
                    return False
                was = self._original_value(key).reshape(-1)[:elements].to(now.dtype)
                if not _same_bits(now, was):
                    return True
            return False

    def invalidate(self) -> None:
        """The host reloaded the weights (they are A again, or another model): drop the live state
        without writing anything."""
        with self._lock:
            self._forget()
            self._originals.clear()
            self._same_as_file.clear()
            self._safe_inputs.clear()
            self._cached_bytes = 0
            self._layout_cache = None
            self._plan_cache = None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._close_readers()

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._plan_cache = None


class MappedReader(CheckpointReader):
    """A safetensors file mapped once for the whole live session (read-only, private): tensors
    are views into the mapping, so moving a slider again reads B's block from already-mapped pages
    instead of mapping and faulting them in anew. Pickled checkpoints fall back to the core reader."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointReader:
        reader = open_checkpoint(path)
        if not isinstance(reader, SafetensorsReader) or reader.file_size == 0:
            return reader
        return cls(reader)

    def __init__(self, reader: "SafetensorsReader"):
        import mmap

        self._inner = reader
        self.path, self.infos, self.metadata = reader.path, reader.infos, reader.metadata
        with open(reader.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._raw = torch.frombuffer(self._map, dtype=torch.uint8)

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        size = torch.empty((), dtype=info.torch_dtype).element_size()
        if info.offset % size:
            return self._inner.get(key)
        return self._raw[info.offset: info.offset + info.nbytes].view(info.torch_dtype).view(info.shape)

    def close(self) -> None:
        self._raw = None
        try:
            self._map.close()
        except (BufferError, ValueError):  # a tensor view is still alive: the GC unmaps it later
            pass
        self._inner.close()


class _ModelAReader(CheckpointReader):
    """Model A for the planner and the engine: its file's header, and for every key whose
    original was captured bit-identical to the file, the RAM copy instead of the file's bytes."""

    def __init__(self, reader: CheckpointReader, live: "LiveMerge"):
        self._reader, self._live = reader, live
        self.path, self.infos, self.metadata = reader.path, reader.infos, reader.metadata

    def get(self, key: str) -> torch.Tensor:
        if key in self._live._same_as_file:
            value = self._live._originals.get(key)
            if value is not None:
                return value
        return self._reader.get(key)


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


_scratch = _ScratchBuffers()


_PARTS = (("first_stage_model.", "VAE"), ("cond_stage_model.", "text encoders"), ("conditioner.", "text encoders"))


def _part_of(key: str) -> str:
    return next((name for prefix, name in _PARTS if key.startswith(prefix)), "other keys")


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included), compared as integers of the
    element's width, which torch compares several times faster than bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))


def block_parameters(plan: MergePlan, recipe: Recipe):
    """``block_settings`` of ``recipe`` for the models and method of the cached ``plan``."""
    return block_settings(plan.method, plan.info.arch, recipe, len(plan.inputs))


def replan(plan: MergePlan, recipe: Recipe) -> MergePlan:
    """``plan`` with α/β and the block weights of ``recipe`` (same models, method, parameters and
    seed): the per-key rules of ``plan_merge`` applied to the cached jobs."""
    per_block, block_values = block_parameters(plan, recipe)
    jobs: list[KeyJob] = []
    for job in plan.jobs:
        if job.action != "merge":
            jobs.append(job)
            continue
        key_params, identity, sources = per_block[job.block]
        # job.params' other entries are the planner's whole-model values (cosine's sims_range): kept
        jobs.append(KeyJob(job.key, job.action, job.block, job.shape, job.out_dtype, dict(job.params, **key_params),
                           sources, identity, job.common_channels))
    return MergePlan(recipe, plan.method, plan.inputs, plan.info, jobs, list(plan.warnings), block_values)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def arch_of_file(path: str | os.PathLike[str]):
    """The architecture record of a checkpoint file (header only)."""
    with open_checkpoint(path) as reader:
        return detect_architecture(reader.shapes(), reader.metadata, source=str(path)).arch

