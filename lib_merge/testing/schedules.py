"""Noise-level schedules for tests and benchmarks (SD's discrete σ table, Karras et al.)."""
from __future__ import annotations

import torch


def sd_discrete_sigmas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t) of SD's "scaled linear" β schedule (Rombach et al. 2022 config)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (arXiv 2206.00364 eq. 5) noise levels, with a final 0 appended as k-diffusion does."""
    ramp = torch.linspace(0, 1, n)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1)])
