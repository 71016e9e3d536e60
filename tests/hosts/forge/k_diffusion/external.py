# Follows k_diffusion/external.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""k_diffusion/external.py (Forge): ForgeScheduleLinker exposes the predictor's sigmas to samplers."""
import torch


class ForgeScheduleLinker(torch.nn.Module):
    def __init__(self, predictor):
        super().__init__()
        self.predictor = predictor
        self.sigmas = predictor.sigmas
        self.log_sigmas = predictor.log_sigmas
