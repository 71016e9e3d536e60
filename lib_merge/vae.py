"""Baking a VAE into a merge: the recipe's ``vae`` (a standalone VAE file or a whole checkpoint)
replaces model A's VAE keys in the output, cast to the output dtype.

It is part of turning a recipe into a plan, so every path from a recipe to a file — the CLI's
``merge`` / ``merge --recipe``, the board's Save, a resumed merge — bakes the same VAE, and a file's
own recipe reproduces it."""
from __future__ import annotations

from pathlib import Path

import torch

from .arch import detect_architecture
from .arch.keys import UNET_PREFIX, VAE_PREFIX
from .errors import ArchitectureMismatchError, MergeError
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


# SD1 and SD2 share one latent space (and VAE); SDXL's VAE has the same layout but another
# latent space, so its keys fit an SD1 model exactly and decode its latents wrongly.
_LATENT_SPACE = {"sd1": "SD1/SD2", "sd2": "SD1/SD2", "sdxl": "SDXL"}


def vae_latent_space(source: CheckpointReader) -> tuple[str, str] | None:
    """(latent space, what says so) for ``source``: a whole checkpoint by its architecture, a
    standalone VAE by its ``modelspec.architecture``; None when the file does not tell (VAE files
    without metadata are indistinguishable by shape)."""
    if any(k.startswith(UNET_PREFIX) for k in source.infos):
        try:
            info = detect_architecture(source.shapes(), source.metadata, source=str(source.path))
        except MergeError:
            return None
        return _LATENT_SPACE.get(info.arch.name, info.arch.label), f"it is a {info.arch.label} checkpoint"
    declared = str(source.metadata.get("modelspec.architecture", "")).lower()
    if "stable-diffusion" not in declared:
        return None
    space = "SDXL" if "-xl-" in declared or declared.endswith("-xl") else "SD1/SD2"
    return space, f"its metadata says {declared!r}"


def bake_vae(plan: MergePlan, source: CheckpointReader) -> int:
    """Point every VAE key of ``plan`` at ``source`` (which the plan then owns and closes with its
    inputs); returns the number of keys. All of A's VAE keys must be found there, or none is
    replaced: a half-swapped VAE decodes garbage."""
    found = vae_latent_space(source)
    wanted = _LATENT_SPACE.get(plan.info.arch.name, plan.info.arch.label)
    if found is not None and found[0] != wanted:
        raise ArchitectureMismatchError(
            f"{Path(source.path).name} is a VAE for {found[0]} models ({found[1]}) but model A is "
            f"{plan.info.arch.label}; its latents would decode wrongly — pick a VAE for {wanted}"
        )
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
