"""A k-diffusion-style x0 denoiser over the ε-predicting tiny U-Net, for sampler tests and benchmarks."""
from __future__ import annotations

import torch
from torch import nn

from .schedules import sd_discrete_sigmas
from .unet import UNetModel


class EpsDenoiser(nn.Module):
    """k-diffusion-style wrapper ``D(x, sigma, cond) = x − σ·ε(x/√(σ²+1), t(σ))`` over an ε-predicting U-Net."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.unet = unet
        self.register_buffer("sigmas", sd_discrete_sigmas(), persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of σ by linear interpolation in log σ (as k-diffusion's discrete wrappers)."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo + frac

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if isinstance(cond, dict):
            context, y = cond["crossattn"], cond.get("vector")
        else:
            context, y = cond, None
        c_in = (1.0 / (sigma**2 + 1.0).sqrt())[:, None, None, None]
        eps = self.unet(x * c_in.to(x.dtype), self.sigma_to_t(sigma), context, y=y)
        return x - eps * sigma[:, None, None, None].to(x.dtype)
