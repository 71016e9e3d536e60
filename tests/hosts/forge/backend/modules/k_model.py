# Follows backend/modules/k_model.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/modules/k_model.py: KModel (storage and computation dtypes), apply_model(x, t, c_concat, c_crossattn, control,
transformer_options, **kwargs) with an ε predictor (σ in, x0 out), and memory_required."""
import torch

from lib_merge.testing.unet import sd_discrete_sigmas


class Predictor:
    def __init__(self):
        self.sigmas = sd_discrete_sigmas()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def calculate_input(self, sigma, noise):
        return noise / (sigma**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, storage_dtype=torch.float32, computation_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = Predictor()
        self.storage_dtype = storage_dtype
        self.computation_dtype = computation_dtype
        self.calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls.append(x.shape[0])
        sigma = t
        xc = self.predictor.calculate_input(sigma[:, None, None, None], x)
        if c_concat is not None:
            xc = torch.cat([xc] + [c_concat], dim=1)
        timestep = self.predictor.timestep(t).float()
        out = self.diffusion_model(xc, timestep, context=c_crossattn, control=control, transformer_options=transformer_options, **kwargs)
        return self.predictor.calculate_denoised(sigma[:, None, None, None], out.float(), x)

    def memory_required(self, input_shape):
        return 1.28 * input_shape[0] * input_shape[2] * input_shape[3] * 4 * 16384
