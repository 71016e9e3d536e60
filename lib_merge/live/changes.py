"""Planning what changed: which keys of the loaded model an apply must write.

The recipe is planned once per model set / method / parameters / seed; a change of α, β or block
weights only re-derives the per-block values (``replan``, ``block_parameters``). Every block then
gets a signature of everything its values depend on (None: A); a key's signature adds every LoRA
patch that touches it (the LoRA's file, module, and strength × the block's LoRA weight), and only
keys whose signature differs from what the model holds are written. ``LiveReport`` says what one
apply/restore did.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..lora.attach import takes_patches
from ..plan import KeyJob, MergePlan, bakes_loras_into_a, block_settings
from ..recipe import Recipe

if TYPE_CHECKING:
    from .loras import LoraPatches


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
    lora_save_only_parts: list[str] = field(default_factory=list)  # parts the LoRAs change in the file only
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
        if self.lora_save_only_parts:
            parts = " and ".join(self.lora_save_only_parts)
            text += f"; the LoRAs also change the {parts} of the saved file, which the preview does not hold"
        return text


def file_identity(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


_PARTS = (("first_stage_model.", "VAE"), ("cond_stage_model.", "text encoders"), ("conditioner.", "text encoders"))


def _part_of(key: str) -> str:
    return next((name for prefix, name in _PARTS if key.startswith(prefix)), "other keys")


def block_parameters(plan: MergePlan, recipe: Recipe):
    """``block_settings`` of ``recipe`` for the models and method of the cached ``plan``."""
    if bakes_loras_into_a(recipe):
        return {block: ({}, True, (0,)) for block in plan.info.arch.blocks}, {}
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


def loaded_jobs(plan: MergePlan, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype):
    """The plan's keys that the loaded model holds, by block, each with the dtype it is produced
    in: every merged key, and the copied float keys a LoRA may patch (written only then); and the
    merged keys it lacks, each with its block and the part of the model it belongs to."""
    by_block: dict[str, list[tuple[KeyJob, torch.dtype]]] = {}
    skipped: dict[str, tuple[str, str]] = {}
    for job in plan.jobs:
        found = layout.get(job.key)
        if job.action != "merge":
            if found is not None and found[0] == tuple(job.shape) and job.out_dtype.is_floating_point \
                    and takes_patches(job):
                by_block.setdefault(job.block, []).append((job, job.out_dtype))  # the file keeps A's dtype
            continue
        if found is None or found[0] != tuple(job.shape):
            # not in the loaded model (VAE, text encoders): merged on save only
            skipped[job.key] = (job.block, _part_of(job.key))
            continue
        # The recipe's output dtype, as in the saved file: the model then holds exactly
        # what loading that file would give it (cast on write when its dtype differs).
        by_block.setdefault(job.block, []).append((job, dtype))
    return by_block, skipped


def block_signature(plan: MergePlan, model_ids: tuple, params: dict, identity: bool, sources: tuple) -> tuple | None:
    """What a block holds after this recipe: None for A, else everything its values depend on."""
    if identity:
        return None
    items = tuple(sorted((k, repr(v)) for k, v in params.items()))
    return (plan.method.name, model_ids, plan.recipe.seed, items, sources)


def changed_work(plan: MergePlan, model_ids: tuple, per_block: dict,
                 jobs_by_block: dict[str, list[tuple[KeyJob, torch.dtype]]], block_state: dict[str, tuple | None],
                 applied: dict[str, tuple], dirty: set[str], loras: "LoraPatches"):
    """The keys to write, each with the signature it will hold (None: A's original), and every
    block's new signature. A block that already holds exactly this (the same merge and the same
    LoRA list) is not even looked at, unless a failed apply left some of its keys half-written
    (``dirty``); in the others only keys whose own signature changed are written."""
    work: list[tuple[KeyJob, tuple | None]] = []
    block_sigs: dict[str, tuple | None] = {}
    for block, jobs in jobs_by_block.items():
        params, identity, sources = per_block[block]
        merge_sig = block_signature(plan, model_ids, params, identity, sources)
        block_sig = None if merge_sig is None and loras.token is None else (merge_sig, loras.token)
        block_sigs[block] = block_sig
        if block_sig == block_state.get(block) and not (dirty and any(j.key in dirty for j, _ in jobs)):
            continue
        for job, dtype in jobs:
            patches = loras.patches.get(job.key) if takes_patches(job) else None
            lora_sig = loras.signatures[job.key] if patches else ()
            if job.action != "merge":
                signature = ("copy", str(dtype), lora_sig) if patches else None
                new = KeyJob(job.key, job.action, block, job.shape, dtype, {}, job.sources, patches=patches)
            else:
                signature = None if merge_sig is None and not patches else \
                    (merge_sig, job.common_channels, str(dtype), lora_sig)
                # job.params' other entries are the planner's whole-model values (cosine's sims_range): kept
                new = KeyJob(job.key, job.action, block, job.shape, dtype, dict(job.params, **params), sources,
                             identity, job.common_channels, patches)
            if signature != applied.get(job.key):
                work.append((new, signature))
    return work, block_sigs
