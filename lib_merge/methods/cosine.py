"""supermerger's cosineA / cosineB (hako-mikan/sd-webui-supermerger, scripts/mergers/mergers.py
`precosine` and `cosine`, read at HEAD of the mirror): a per-column similarity of A and B picks,
per column, how much of A is kept.

Both need one number range over the whole model before any key is merged: the "Stage 0/2" pass
collects every key's similarities (keys with "model" in the name, the VAE left out), drops NaN,
then the values below the 1st percentile and, of the rest, those above the 99th (numpy's
'midpoint' percentiles); its min and max normalise each key's similarities. The planner runs
that pass (``prepass``) and hands the range to every key as ``sims_range``; the range is kept
per input files (``prepass_cache``), so planning the same pair again reads neither model.

Per key, k = clip((s − min)/(max − min) − α, 0, 1) is A's share: out = B + k·(A − B), in fp32 (the
form of supermerger's "use lerp" option). The VAE and keys without "model" in the name keep A,
as there. cosine_a ("favours A's structure with details from B") normalises each column of A and B
first and subtracts |α|; its pre-pass collects the plain column cosine but its merge uses the
mean of that and the whole-tensor cosine (as supermerger does). cosine_b uses the raw tensors,
subtracts α, and collects and uses the mean in both passes. 0-dim tensors (where supermerger's
dim-0 similarity fails) are left out of the pass and keep A.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from ..errors import MergeError
from . import prepass_cache
from .params import ALPHA
from .registry import KeyContext, merge_method

REFERENCE = "https://github.com/hako-mikan/sd-webui-supermerger"


def _applies(key: str) -> bool:
    return "model" in key and "first_stage_model" not in key


def _similarity(a: torch.Tensor, b: torch.Tensor, favour_a: bool, *, for_range: bool) -> torch.Tensor:
    """The per-column similarity (dim 0 reduced; a 1-D tensor gives one value) in fp32."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    if favour_a:
        a, b = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
    columns = F.cosine_similarity(a, b, dim=0)
    if favour_a and for_range:
        return columns  # supermerger's cosineA pre-pass collects the column cosine alone
    whole = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.norm(a) * torch.norm(b))
    return (columns + whole) / 2.0


def _midpoint_percentile(ordered: torch.Tensor, q: float) -> float:
    """numpy.percentile(x, q, method='midpoint') of the sorted fp64 ``ordered``."""
    position = q / 100.0 * (ordered.numel() - 1)
    return (float(ordered[math.floor(position)]) + float(ordered[math.ceil(position)])) / 2.0


def similarity_range(values: Iterable[torch.Tensor]) -> tuple[float, float]:
    """(min, max) of all similarities after supermerger's NaN drop and 1st/99th-percentile trims."""
    sims = torch.cat([v.reshape(-1).to(torch.float64) for v in values] or [torch.zeros(0, dtype=torch.float64)])
    sims = sims[~torch.isnan(sims)].sort().values
    if not sims.numel():
        raise MergeError("cosine merge: no key of A and B gives a similarity (no 'model' keys in common?)")
    sims = sims[sims >= _midpoint_percentile(sims, 1)]
    sims = sims[sims <= _midpoint_percentile(sims, 99)]
    return float(sims[0]), float(sims[-1])


def _prepass(favour_a: bool):
    def cache_key(plan) -> tuple | None:
        return prepass_cache.plan_key(plan, (0, 1), (favour_a,))

    def run(plan) -> dict:
        a, b = plan.inputs[0], plan.inputs[1]
        if not hasattr(b, "infos"):
            raise MergeError(f"{plan.method.name}: model B must be a checkpoint file (its similarity to A is measured)")
        key = cache_key(plan)
        cached = prepass_cache.CACHE.get(key) if key is not None else None
        if cached is not None:
            return cached
        values = []
        for name, info in a.infos.items():
            if not _applies(name) or name not in b.infos or not info.shape:  # ints too (position_ids), as there
                continue
            values.append(_similarity(a.get(name), b.get(name), favour_a, for_range=True))
        result = {"sims_range": similarity_range(values)}
        if key is not None:
            prepass_cache.CACHE.put(key, result)
        return result

    run.cache_key = cache_key  # type: ignore[attr-defined]
    return run


def _merge(a: torch.Tensor, b: torch.Tensor, ctx: KeyContext, alpha: float, sims_range, favour_a: bool) -> torch.Tensor:
    if sims_range is None:
        raise MergeError("cosine merges need the whole-model similarity pass of the planner (plan_merge)")
    if not _applies(ctx.key) or a.dim() == 0:
        return a.to(torch.float32)
    low, high = sims_range
    # A zero tensor (an untrained norm bias, a zero-initialised projection) has no direction: the
    # whole-tensor cosine is 0/0. supermerger's formula writes NaN into that key, which ruins the
    # model; here it counts as unrelated (0), as the column cosine already does. The pre-pass
    # keeps dropping those NaN, as supermerger's does, so the range is unchanged.
    s = _similarity(a, b, favour_a, for_range=False).nan_to_num_(nan=0.0)
    k = ((s - low) / (high - low) - (abs(alpha) if favour_a else alpha)).clip(min=0, max=1.0)
    return torch.lerp(b.to(torch.float32), a.to(torch.float32), k)


@merge_method("cosine_a", inputs=("A", "B"), params=(ALPHA,), reference=REFERENCE)
def cosine_a(a: torch.Tensor, b: torch.Tensor, *, ctx: KeyContext, alpha: float, sims_range=None) -> torch.Tensor:
    """supermerger cosineA: per column, A's share from the similarity of the column-normalised A
    and B, normalised over the whole model's range, minus |α| (α = 0 keeps the most of A)."""
    return _merge(a, b, ctx, alpha, sims_range, True)


@merge_method("cosine_b", inputs=("A", "B"), params=(ALPHA,), reference=REFERENCE)
def cosine_b(a: torch.Tensor, b: torch.Tensor, *, ctx: KeyContext, alpha: float, sims_range=None) -> torch.Tensor:
    """supermerger cosineB: as cosine_a on the raw tensors (column cosine averaged with the
    whole-tensor cosine in both passes), minus α."""
    return _merge(a, b, ctx, alpha, sims_range, False)


cosine_a.prepass = _prepass(True)  # type: ignore[attr-defined]
cosine_b.prepass = _prepass(False)  # type: ignore[attr-defined]
