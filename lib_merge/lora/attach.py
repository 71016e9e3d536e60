"""The merge's LoRA step: open the recipe's LoRAs, bind them to the plan's keys and hang each
key's patches on its job, so the engine adds the deltas in fp32 after the method and before the
output cast (``engine.produce``), and the memory planner counts the keys they touch."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..errors import MergeError
from ..plan import MergePlan
from .formats import LoraFile
from .patches import LoraSpec, bind


def lora_specs(recipe) -> list[LoraSpec]:
    return [LoraSpec(l["path"], float(l.get("strength", 1.0)), l.get("weights"), l.get("sha256", "")) for l in recipe.loras]


@contextmanager
def attached_loras(plan: MergePlan) -> Iterator[list[LoraFile]]:
    """Bind ``plan.recipe.loras`` to ``plan`` for the duration of the block (the files stay open
    while the engine reads their tensors)."""
    opened: list[LoraFile] = []
    try:
        problems = []
        specs = lora_specs(plan.recipe)
        for spec in specs:
            try:
                opened.append(LoraFile(spec.path))
            except MergeError as exc:
                problems.append(str(exc))
        if problems:
            raise MergeError("; ".join(problems))
        if opened:
            template = plan.inputs[0]
            binding = bind(list(zip(opened, specs)), template.shapes(), plan.info.arch, plan.recipe.blocks)
            plan.warnings.extend(binding.warnings)
            for job in plan.jobs:
                patches = binding.patches.get(job.key)
                if patches and job.sources[0] == 0:
                    job.patches = patches
        yield opened
    finally:
        for lora in opened:
            lora.close()
