"""Classifier-free guidance in D (x0) space, with A1111's ``AND`` sub-prompts.

Every guidance term here is linear in the predictions, so it reads the same in D or ε space.
With ``AND`` prompts an image owns several cond rows; ``conds_list[i]`` lists its
``(row index, weight)`` pairs exactly as A1111's ``reconstruct_multicond_batch`` returns them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import BadParameterError

CondsList = Sequence[Sequence[tuple[int, float]]]


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-image ``t`` broadcasts against an ``ndim`` tensor."""
    missing = ndim - t.ndim
    if missing < 0:
        raise BadParameterError(f"append_dims: tensor has {t.ndim} dims, more than the target {ndim}")
    return t[(...,) + (None,) * missing]


class CondRows:
    """Which image each cond row belongs to, and with what weight (one row per sub-prompt)."""

    def __init__(self, conds_list: CondsList | None, n_cond: int, n_images: int):
        if conds_list is None:
            if n_cond != n_images:
                raise BadParameterError(
                    f"{n_cond} cond rows for {n_images} images: pass conds_list to say which rows belong to which image"
                )
            pairs = [(i, i, 1.0) for i in range(n_images)]
        else:
            if len(conds_list) != n_images:
                raise BadParameterError(f"conds_list has {len(conds_list)} entries for {n_images} images")
            pairs = []
            for image, subprompts in enumerate(conds_list):
                if not subprompts:
                    raise BadParameterError(f"conds_list[{image}] is empty: every image needs at least one cond row")
                for row, weight in subprompts:
                    if not 0 <= int(row) < n_cond:
                        raise BadParameterError(f"conds_list[{image}] names row {row}, but there are {n_cond} cond rows")
                    pairs.append((int(row), image, float(weight)))
        self.n_cond = n_cond
        self.n_images = n_images
        self.row_ids = [p[0] for p in pairs]
        self.image_ids = [p[1] for p in pairs]
        self.weights = [p[2] for p in pairs]
        # The common case (one weight-1 row per image, in order) needs no gather at all.
        self.identity = self.row_ids == self.image_ids == list(range(n_images)) and all(w == 1.0 for w in self.weights)
        self._cache: dict = {}

    def _tensors(self, device: torch.device, dtype: torch.dtype):
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self.row_ids, device=device, dtype=torch.long),
                torch.tensor(self.image_ids, device=device, dtype=torch.long),
                torch.tensor(self.weights, device=device, dtype=dtype),
            )
        return self._cache[key]

    def per_row(self, per_image: torch.Tensor) -> torch.Tensor:
        """Expand an image-batch tensor to the cond rows (row k gets its image's values)."""
        if self.identity:
            return per_image
        rows, images, _ = self._tensors(per_image.device, per_image.dtype)
        out = per_image.new_empty((self.n_cond,) + per_image.shape[1:])
        out[rows] = per_image[images]
        return out

    def weighted_sum(self, per_row: torch.Tensor) -> torch.Tensor:
        """``Σ_k weight_k · t[row_k]`` for each image, where ``t`` has one entry per cond row."""
        if self.identity:
            return per_row
        rows, images, weights = self._tensors(per_row.device, per_row.dtype)
        terms = per_row[rows] * append_dims(weights, per_row.ndim)
        out = per_row.new_zeros((self.n_images,) + per_row.shape[1:])
        return out.index_add_(0, images, terms)

    def weighted_mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """Weight-normalised mean of each image's sub-prompt rows (the first row if weights sum to 0)."""
        if self.identity:
            return per_row
        total = [0.0] * self.n_images
        first: list[int | None] = [None] * self.n_images
        for row, image, weight in zip(self.row_ids, self.image_ids, self.weights):
            total[image] += weight
            if first[image] is None:
                first[image] = row
        summed = self.weighted_sum(per_row)
        out = torch.empty_like(summed)
        for image in range(self.n_images):
            if abs(total[image]) > 1e-12:
                out[image] = summed[image] / total[image]
            else:
                out[image] = per_row[first[image]]
        return out


def guidance_delta(d_cond: torch.Tensor, d_ref: torch.Tensor, rows: CondRows) -> torch.Tensor:
    """Σ_k weight_k·(D_c,k − D_ref) per image: the AND operator of composable diffusion (Liu et al. arXiv 2206.01714)."""
    return rows.weighted_sum(d_cond - rows.per_row(d_ref))


def cfg_combine(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale: float,
    conds_list: CondsList | None = None,
) -> torch.Tensor:
    """D = D_u + Σ_k weight_k·w·(D_c,k − D_u) (Ho & Salimans arXiv 2207.12598 eq. 6 with A1111's w; AND sum of arXiv 2206.01714)."""
    rows = CondRows(conds_list, d_cond.shape[0], d_uncond.shape[0])
    return d_uncond + scale * guidance_delta(d_cond, d_uncond, rows)
