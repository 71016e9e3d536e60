"""SCE (select, calculate, erase) from mergekit (arcee-ai/mergekit a6e4028, `merge_methods/sce.py`).

The P task vectors are held as one P × n fp32 matrix (the base and one fine-tune mapped while it
is filled); everything per element runs over column blocks of it, which gives the whole-tensor
results bit for bit (each column is reduced on its own). Two steps need whole tensors: the
energies (one row squared at a time) and, with select_topk < 1, ``topk`` over the variances —
kept as it is because with fp16 inputs the variances tie at the threshold and topk's choice
among ties decides the result.
"""
from __future__ import annotations

from typing import Any

import torch

from .median import row_chunk, serial_torch
from .registry import KeyContext, Param, merge_method
from .sparsify import chunks
from .task_vector import difference, lazy_inputs, load

TOPK = Param("select_topk", float, 1.0, "fraction of entries kept by largest across-model variance of the task vectors (1 = all)",
             0.0, 1.0)


def sce_copies(n: int, params: dict[str, Any] | None = None) -> float:
    """fp32 copies of a key for N inputs: the P = N − 1 task vectors and the result (or one row's
    square); with select_topk < 1, while topk runs, the variances, its (value, index) work pairs
    (16 bytes an element) and its k values and int64 indices."""
    topk = float((params or {}).get("select_topk", TOPK.default))
    select = 0.0 if topk >= 1 else 1 + (4 + 3 * topk if topk > 0 else 0)  # topk = 0 keeps nothing: no topk
    return (n - 1) + 1 + select


@merge_method("sce", inputs=("A", "B"), params=(TOPK,), variadic=True, reference="https://arxiv.org/abs/2408.07990")
@lazy_inputs(lambda n: sce_copies(n))
def sce(*models, ctx: KeyContext, select_topk: float) -> torch.Tensor:
    """A + Σwᵢmᵢτᵢ / max(Σwᵢmᵢ, 1e-6), τᵢ = θᵢ − A (A is the base): select — with select_topk < 1,
    keep only the ⌊nnz(var)·topk⌋ entries of largest variance across the τᵢ; calculate — scalar
    wᵢ = mean(τᵢ²)/Σⱼmean(τⱼ²); erase — mᵢ = [sign τᵢ = sign Στ] (a zero sum counts as +)."""
    with serial_torch():
        return _sce(models[0], models[1:], select_topk)


def _sce(base_source, sources, select_topk: float) -> torch.Tensor:
    base = load(base_source)
    shape, n, count = base.shape, base.numel(), len(sources)
    flat_base = base.reshape(-1)
    tau = torch.empty(count, n, dtype=torch.promote_types(base.dtype, torch.float32))
    for i, source in enumerate(sources):
        difference(load(source), base, out=tau[i])  # the fine-tune is unmapped after its row
    across = row_chunk(count)
    if select_topk < 1:
        _select_(tau, select_topk, across)
    energy = torch.stack([row.square().mean() for row in tau])  # one row's square at a time
    total = float(energy.sum())
    w = (energy / total if total > 0 else torch.full_like(energy, 1.0 / len(energy)))[:, None]
    out = torch.empty(n, dtype=tau.dtype)
    for part in chunks(n, across):
        block = tau[:, part]
        sign = torch.where(block.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (torch.sign(block) == sign).float()
        num = (w * agree * block).sum(dim=0)
        den = (w * agree).sum(dim=0).clamp_min(1e-6)
        out[part].copy_(flat_base[part]).add_(num / den)
    return out.view(shape)


def _select_(tau: torch.Tensor, select_topk: float, across: int) -> None:
    """Zero, in place, every column outside the ⌊nnz(var)·topk⌋ of largest variance."""
    n = tau.shape[1]
    var = torch.empty(n, dtype=tau.dtype)
    nonzero = 0
    for part in chunks(n, across):
        torch.var(tau[:, part], dim=0, unbiased=False, out=var[part])
        nonzero += int((var[part] != 0).sum())
    keep = int(nonzero * select_topk)
    mask = torch.zeros(n, dtype=torch.bool)
    if keep:
        # unsorted: the same chosen set as topk(keep), without sorting it
        mask[var.topk(keep, sorted=False).indices] = True
    del var
    for part in chunks(n, across):
        tau[:, part].mul_(mask[part])


sce.working_copies_with = sce_copies  # type: ignore[attr-defined]
sce.working_set = "the P task vectors and the result (with select_topk < 1: topk's buffers while it runs)"  # type: ignore[attr-defined]
