# Follows k_diffusion/external.py of the k-diffusion checkout A1111 v1.10.1 (tag v1.10.1) pins (repositories/k-diffusion).
"""k_diffusion.external.CompVisDenoiser: D = x − σ·ε(x/√(σ²+1), t(σ)) over ``model.apply_model``."""
import torch


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model, quantize=False):
        super().__init__()
        self.inner_model = model
        alphas_cumprod = model.alphas_cumprod
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        self.register_buffer("log_sigmas", self.sigmas.log())

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def forward(self, input, sigma, **kwargs):
        c_out, c_in = -sigma[:, None, None, None], 1 / (sigma**2 + 1) ** 0.5
        eps = self.inner_model.apply_model(input * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return input + eps * c_out
