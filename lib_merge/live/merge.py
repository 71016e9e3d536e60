"""``LiveMerge``: one live session over a loaded model — the orchestration of planning what
changed (``changes``), keeping A's originals (``originals``), the recipe's LoRAs (``loras``),
producing merged values (``produce``) and writing them through the target (``target``), with the
locking, the worker thread and the roll-back to A on failure.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..errors import MergeError
from ..inputs import VirtualInput, parse_model_ref
from ..io.dtypes import output_dtype
from ..io.reader import CheckpointReader
from ..plan import KeyJob, MergePlan, bakes_loras_into_a, plan_merge
from ..recipe import Recipe
from ..torch_threads import on_one_torch_thread
from .changes import LiveReport, block_parameters, changed_work, file_identity, loaded_jobs
from .loras import SessionLoras
from .originals import ModelAReader, Originals, same_bits
from .produce import merge_into, numel, scratch, spread
from .target import LiveMergeError, LiveTarget, WriteItem, copy_into, put, write_context


class LiveMerge:
    """Runtime merge into the model loaded from ``model_a`` (see the package docstring).

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
        self._log = log or (lambda message: None)
        self._lock = threading.RLock()
        self._identity = target.identity()
        self.originals = Originals(target, self.model_a, cache_limit_bytes)
        self._applied: dict[str, tuple] = {}  # key -> signature of the merge it holds (absent: A)
        self._applied_block: dict[str, str] = {}
        self._plan_cache: tuple[tuple, MergePlan] | None = None
        self._dirty: set[str] = set()  # keys being written by the current apply (rolled back on failure)
        self._safe_inputs: dict[tuple[int, str], bool] = {}  # (input, key) -> finite, no overflow risk
        self._block_state: dict[str, tuple | None] = {}  # block -> signature it holds (absent: A)
        self._jobs_by_block: dict[str, list[tuple[KeyJob, torch.dtype]]] = {}
        self._skipped: dict[str, tuple[str, str]] = {}  # merged key the loaded model lacks -> (block, part)
        self.loras = SessionLoras()  # the recipe's LoRA files, open for the session
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
    def cache_limit_bytes(self) -> int | None:
        return self.originals.cache_limit_bytes

    @cache_limit_bytes.setter
    def cache_limit_bytes(self, limit: int | None) -> None:
        self.originals.cache_limit_bytes = limit

    @property
    def original_bytes(self) -> int:
        return self.originals.cached_bytes

    def matches(self, target: LiveTarget) -> bool:
        return target.identity() == self._identity

    def _inputs(self, recipe: Recipe) -> list[CheckpointReader | VirtualInput]:
        inputs: list[CheckpointReader | VirtualInput] = []
        for i, ref in enumerate(recipe.models):
            parsed = parse_model_ref(ref)
            if isinstance(parsed, VirtualInput):
                inputs.append(parsed)
            elif i == 0:
                inputs.append(ModelAReader(self.originals.reader(parsed), self.originals))
            else:
                inputs.append(self.originals.reader(parsed))
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
        files = tuple(file_identity(Path(m)) for m in recipe.models if isinstance(parse_model_ref(m), str))
        # The LoRA list changes no job of the plan (the LoRAs are bound per apply, ``loras``), except
        # that a single model with LoRAs is `merge A --lora X`, planned as A everywhere.
        lora_only = bakes_loras_into_a(recipe)
        skeleton = (recipe.replace(alpha=None, beta=None, weights=None, beta_weights=None, loras=()), files, lora_only)
        cached = self._plan_cache
        if cached is None or cached[0] != skeleton:
            if cached is not None and cached[0][1] != files:  # a file changed on disk: map it anew
                self._close_readers()
            plan = plan_merge(recipe, self._inputs(recipe))
            self._plan_cache = (skeleton, plan)
            self._safe_inputs.clear()
            self._model_ids = tuple(
                ref.spec if isinstance(ref, VirtualInput) else file_identity(ref.path) for ref in plan.inputs
            )
            self._jobs_by_block, self._skipped = loaded_jobs(plan, self._layout(), output_dtype(recipe.dtype))
            return plan
        return cached[1]

    def _layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._layout_cache is None:
            self._layout_cache = {k: (tuple(t.shape), t.dtype) for k, t in self.target.tensors().items()}
        return self._layout_cache

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
            loras = self.loras.bind(recipe, plan)  # a bad LoRA stops here: nothing written yet
            per_block, _ = block_parameters(plan, recipe)
            report = LiveReport(warnings=list(plan.warnings) + loras.warnings, skipped_keys=len(self._skipped))
            self._save_only(report, per_block, loras.patches)
            work, block_sigs = changed_work(plan, self._model_ids, per_block, self._jobs_by_block,
                                            self._block_state, self._applied, self._dirty, loras)
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

    def _save_only(self, report: LiveReport, per_block: dict, lora_keys: dict) -> None:
        """What the saved file changes where the loaded model has no key: blocks whose merge is not
        A, and the parts a LoRA patches (the text encoders on Forge)."""
        merged: dict[str, set[str]] = {}
        by_lora: set[str] = set()
        for key, (block, part) in self._skipped.items():
            if block in per_block and not per_block[block][1]:
                merged.setdefault(block, set()).add(part)
            elif key in lora_keys:
                by_lora.add(part)
        report.save_only_blocks = sorted(merged)
        report.save_only_parts = sorted(set().union(*merged.values()))
        report.lora_save_only_parts = sorted(by_lora - set(report.save_only_parts))

    def _run(self, plan: MergePlan, work: list, report: LiveReport) -> None:
        # Block by block, so a failure can be rolled back. All of a block's originals are taken
        # before any of its keys is written (a host write may drop the LoRA backups of a module);
        # then each key is merged and written on its own, on a few threads, largest keys first.
        by_block: dict[str, list] = {}
        for item in work:
            by_block.setdefault(item[0].block, []).append(item)
        pool = self._executor() if len(work) > 1 else None
        for block, items in by_block.items():
            sizes = [numel(job.shape) for job, _ in items]
            spread(pool, self.threads, lambda item: self.originals.capture(item[0].key), items, sizes)
            spread(pool, self.threads, lambda item: self._produce(plan, *item), items, sizes)
            for job, signature in items:
                if signature is None:
                    self._applied.pop(job.key, None)
                    self._applied_block.pop(job.key, None)
                else:
                    self._applied[job.key] = signature
                    self._applied_block[job.key] = block
                self._dirty.discard(job.key)
                report.keys += 1
                report.bytes += numel(job.shape) * torch.empty((), dtype=job.out_dtype).element_size()
            report.blocks.append(block)
        self.target.flush()

    def _produce(self, plan: MergePlan, job: KeyJob, signature: tuple | None) -> None:
        """One key into the model: streamed straight into its tensor (plain CPU targets), or into
        this thread's scratch buffer handed to ``target.write`` (which copies it)."""
        direct = self.target.direct(job.key, job.out_dtype)
        self._dirty.add(job.key)  # from here on a failure must put A back into this key
        if signature is None:
            value = self.originals.value(job.key)
            if direct is None:
                self.target.write([WriteItem(job.key, value, True)])
            else:
                copy_into(direct, value)
            return
        if direct is not None:
            with write_context(direct):
                merge_into(plan, job, direct.view(-1), self._safe_inputs)
            return
        out = scratch.get(job.out_dtype, numel(job.shape))
        merge_into(plan, job, out, self._safe_inputs)
        self.target.write([WriteItem(job.key, out.view(job.shape), False)])

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
        keys = list(self._applied) + [k for k in self._dirty if k not in self._applied and k in self.originals]
        by_block: dict[str, list[str]] = {}
        for key in keys:
            by_block.setdefault(self._applied_block.get(key, "?"), []).append(key)
        pool = self._executor() if len(keys) > 1 else None

        def put_back(key: str) -> None:
            put(self.target, key, self.originals.value(key), True)

        for block, block_keys in by_block.items():
            sizes = [self._layout().get(k, ((0,), None))[0] for k in block_keys]
            spread(pool, self.threads, put_back, block_keys, [numel(shape) for shape in sizes])
            for k in block_keys:
                value = self.originals.kept.get(k)
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
                was = self.originals.value(key).reshape(-1)[:elements].to(now.dtype)
                if not same_bits(now, was):
                    return True
            return False

    def invalidate(self) -> None:
        """The host reloaded the weights (they are A again, or another model): drop the live state
        without writing anything."""
        with self._lock:
            self._forget()
            self.originals.clear()
            self._safe_inputs.clear()
            self._layout_cache = None
            self._plan_cache = None
            self.loras.close()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._close_readers()
            self.loras.close()

    def _close_readers(self) -> None:
        self.originals.close_readers()
        self._plan_cache = None
