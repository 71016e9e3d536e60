"""Baking a VAE into a merge: the recipe's ``vae`` (a standalone VAE file or a whole checkpoint)
replaces model A's VAE keys in the output, cast to the output dtype.

It is part of turning a recipe into a plan, so every path from a recipe to a file — the CLI's
``merge`` / ``merge --recipe``, the board's Save, a resumed merge — bakes the same VAE, and a file's
own recipe reproduces it."""
from __future__ import annotations

from pathlib import Path

import torch

from .arch.keys import VAE_PREFIX
from .errors import ArchitectureMismatchError
from .io.dtypes import TORCH_TO_CODE
from .io.reader import CheckpointReader, TensorInfo
from .plan import KeyJob, MergePlan


class BakedVae(CheckpointReader):
    """The VAE file seen through the merged model's key names (a standalone VAE file has no
    ``first_stage_model.`` prefix) and in the output dtype, as one more input of the plan."""

    def __init__(self, source: CheckpointReader):
        self.source = source
        self.path, self.metadata = source.path, source.metadata
        self.infos: dict[str, TensorInfo] = {}
        self._origin: dict[str, tuple[str, torch.dtype]] = {}

    def offer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Take ``key`` from the VAE file if it holds it with this shape."""
        for name in (key, key[len(VAE_PREFIX):]):
            info = self.source.infos.get(name)
            if info is not None and tuple(info.shape) == tuple(shape):
                size = info.numel * torch.empty((), dtype=dtype).element_size()
                self.infos[key] = TensorInfo(key, info.shape, TORCH_TO_CODE[dtype], -1, size)
                self._origin[key] = (name, dtype)
                return True
        return False

    def get(self, key: str) -> torch.Tensor:
        name, dtype = self._origin[key]
        return self.source.get(name).to(dtype)

    def close(self) -> None:
        self.source.close()


def bake_vae(plan: MergePlan, source: CheckpointReader) -> int:
    """Point every VAE key of ``plan`` at ``source`` (which the plan then owns and closes with its
    inputs); returns the number of keys. All of A's VAE keys must be found there, or none is
    replaced: a half-swapped VAE decodes garbage."""
    vae = BakedVae(source)
    jobs = [(i, job) for i, job in enumerate(plan.jobs) if job.key.startswith(VAE_PREFIX)]
    missing = [job.key for _, job in jobs if not vae.offer(job.key, job.shape, job.out_dtype)]
    if not jobs or missing:
        what = f"lacks {len(missing)} of the model's {len(jobs)} VAE tensors (e.g. {missing[0]})" if missing \
            else "cannot be baked: the model has no VAE keys"
        raise ArchitectureMismatchError(
            f"{Path(source.path).name} {what}; pick a VAE for {plan.info.arch.label}"
        )
    index = len(plan.inputs)
    plan.inputs.append(vae)
    for i, job in jobs:
        plan.jobs[i] = KeyJob(job.key, "copy", job.block, job.shape, job.out_dtype, {}, (index,))
    return len(jobs)
