"""A k-diffusion-style second-order sampler for tests: two model calls per step."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_heun(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args=None) -> torch.Tensor:
    """Heun's method (Karras et al. arXiv 2206.00364 Alg. 1, no churn): 2 calls per step, 1 on the step to σ = 0."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - model(x, sigma * ones, **extra_args)) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - model(x_2, sigma_next * ones, **extra_args)) / sigma_next
        x = x + (d + d_2) / 2 * dt
    return x
