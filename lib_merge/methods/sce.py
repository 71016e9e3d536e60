"""SCE (select, calculate, erase) from mergekit (arcee-ai/mergekit a6e4028, `merge_methods/sce.py`)."""
from __future__ import annotations

import torch

from .registry import KeyContext, Param, merge_method

TOPK = Param("select_topk", float, 1.0, "fraction of entries kept by largest across-model variance of the task vectors (1 = all)",
             0.0, 1.0)


@merge_method("sce", inputs=("A", "B"), params=(TOPK,), variadic=True, reference="https://arxiv.org/abs/2408.07990")
def sce(*models: torch.Tensor, ctx: KeyContext, select_topk: float) -> torch.Tensor:
    """A + Σwᵢmᵢτᵢ / max(Σwᵢmᵢ, 1e-6), τᵢ = θᵢ − A (A is the base): select — with select_topk < 1,
    keep only the ⌊nnz(var)·topk⌋ entries of largest variance across the τᵢ; calculate — scalar
    wᵢ = mean(τᵢ²)/Σⱼmean(τⱼ²); erase — mᵢ = [sign τᵢ = sign Στ] (a zero sum counts as +)."""
    base = models[0]
    tau = torch.stack([m - base for m in models[1:]]).reshape(len(models) - 1, -1)
    if select_topk < 1:
        var = tau.var(dim=0, unbiased=False)
        keep = int(int((var != 0).sum()) * select_topk)
        mask = torch.zeros_like(var, dtype=torch.bool)
        if keep:
            mask[var.topk(keep).indices] = True
        tau = tau * mask
    energy = tau.square().mean(dim=1)
    total = float(energy.sum())
    w = energy / total if total > 0 else torch.full_like(energy, 1.0 / len(energy))
    sign = torch.where(tau.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tau) == sign).float()
    num = (w[:, None] * agree * tau).sum(dim=0)
    den = (w[:, None] * agree).sum(dim=0).clamp_min(1e-6)
    return base + (num / den).reshape(base.shape)
