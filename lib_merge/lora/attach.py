"""The merge's LoRA step: open the recipe's LoRAs, bind them to the plan's keys and hang each
key's patches on its job, so the engine adds the deltas in fp32 after the method and before the
output cast (``engine.produce``), and the memory planner counts the keys they touch.

The live preview (``lib_merge.live.loras``) binds with the same functions, so the keys a LoRA
touches and the patches on each are the same in the preview as in the saved file."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from ..errors import MergeError
from ..plan import KeyJob, MergePlan
from .formats import LoraFile
from .patches import Binding, LoraSpec, bind


def lora_specs(recipe) -> list[LoraSpec]:
    return [LoraSpec(l["path"], float(l.get("strength", 1.0)), l.get("weights"), l.get("sha256", "")) for l in recipe.loras]


def open_loras(specs: Sequence[LoraSpec], opened: list[LoraFile],
               opener: Callable[[LoraSpec], LoraFile] = lambda s: LoraFile(s.path)) -> list[LoraFile]:
    """One opened file per spec, appended to ``opened`` (the caller closes what it owns, also
    after a failure); every unreadable file is named in one MergeError."""
    problems: list[str] = []
    for spec in specs:
        try:
            opened.append(opener(spec))
        except MergeError as exc:
            problems.append(str(exc))
    if problems:
        raise MergeError("; ".join(problems))
    return opened


def bind_to_plan(plan: MergePlan, files: Sequence[LoraFile], specs: Sequence[LoraSpec], blocks: str) -> Binding:
    """The patches of every key of A's header that the LoRAs touch (``blocks``: the block policy
    that places a key in the block whose LoRA block weight applies)."""
    return bind(list(zip(files, specs)), plan.inputs[0].shapes(), plan.info.arch, blocks)


def takes_patches(job: KeyJob) -> bool:
    """LoRAs are baked into keys that start from A (not the prediction markers copied from another model)."""
    return job.sources[0] == 0


@contextmanager
def attached_loras(plan: MergePlan) -> Iterator[list[LoraFile]]:
    """Bind ``plan.recipe.loras`` to ``plan`` for the duration of the block (the files stay open
    while the engine reads their tensors)."""
    opened: list[LoraFile] = []
    try:
        specs = lora_specs(plan.recipe)
        open_loras(specs, opened)
        if opened:
            binding = bind_to_plan(plan, opened, specs, plan.recipe.blocks)
            plan.warnings.extend(binding.warnings)
            for job in plan.jobs:
                patches = binding.patches.get(job.key)
                if patches and takes_patches(job):
                    job.patches = patches
        yield opened
    finally:
        for lora in opened:
            lora.close()
