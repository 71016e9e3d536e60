"""Low-rank factors of one delta (lora-reference.md §4): kohya's layout, up = U·S, down = Vᴴ, so
α = rank gives s = 1. Exact SVD by default; randomized (Halko et al.) with oversampling and power
iterations, seeded per key so results never depend on thread order."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 4


@dataclass
class Factors:
    up: torch.Tensor  # [out, k] (conv: [out, k, 1, 1])
    down: torch.Tensor  # [k, in] (conv: [k, in, kh, kw])
    kept: float  # Σ kept σ²
    total: float  # ‖Δ‖²_F

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def randomized_svd(m: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a rank-q sketch of ``m`` (q = k + oversampling), with QR-stabilised power
    iterations. The kept factors are an orthogonal projection of ``m``, so ‖m − U_k S_k Vh_k‖² =
    ‖m‖² − Σ_k σᵢ² exactly: the reported retained energy is the true error either way."""
    q = min(k + OVERSAMPLE, *m.shape)
    sketch = torch.randn(m.shape[1], q, generator=generator)
    basis, _ = torch.linalg.qr(m @ sketch)
    for _ in range(POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(m.T @ basis)
        basis, _ = torch.linalg.qr(m @ basis)
    u, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return basis @ u, s, vh


def choose_rank(s: torch.Tensor, cap: int, energy: float | None) -> int:
    """``cap``, or with ``energy`` the smallest k whose (Σ_{i≤k}σᵢ²/Σσ²)^½ ≥ energy (kohya's sv_fro),
    capped by ``cap``."""
    cap = max(1, min(cap, s.numel()))
    if energy is None:
        return cap
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0:
        return 1
    frac = torch.sqrt(torch.cumsum(sq, 0) / total)
    k = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype) - 1e-12)) + 1
    return max(1, min(cap, k))


def factorize(delta: torch.Tensor, rank: int, *, energy: float | None = None, clamp_quantile: float | None = None,
              randomized: bool = False, generator: torch.Generator | None = None) -> Factors:
    """Factors of ``delta`` (fp32, 2-D or a conv weight) at ``rank`` (≤ min(out, in))."""
    shape = tuple(delta.shape)
    m = delta.reshape(shape[0], -1)
    cap = max(1, min(rank, *m.shape))
    total = float(m.double().square().sum())
    if randomized and cap < min(m.shape):
        u, s, vh = randomized_svd(m, cap, generator or torch.Generator().manual_seed(0))
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = choose_rank(s, cap, energy)
    up = u[:, :k] * s[:k]
    down = vh[:k].clone()
    kept = float(s[:k].double().square().sum())
    if clamp_quantile is not None and clamp_quantile < 1:
        both = torch.cat([up.reshape(-1), down.reshape(-1)])
        index = max(1, min(both.numel(), math.ceil(clamp_quantile * both.numel())))
        hi = float(both.kthvalue(index).values)
        up.clamp_(-abs(hi), abs(hi))
        down.clamp_(-abs(hi), abs(hi))
    if len(shape) == 4:
        up = up.reshape(shape[0], k, 1, 1)
        down = down.reshape(k, *shape[1:])
    return Factors(up.contiguous(), down.contiguous(), kept, total)
