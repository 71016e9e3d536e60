# Follows modules/sd_samplers_kdiffusion.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/sd_samplers_kdiffusion.py (v1.10.1): the k-diffusion sampler list and CFGDenoiserKDiffusion
(inner model: k-diffusion's CompVisDenoiser); KDiffusionSampler is shared with Forge
(../../shared_src/sd_samplers_kdiffusion.py)."""
import k_diffusion.external

from modules import sd_samplers_cfg_denoiser, shared
from tests.hosts.common import exec_shared

samplers_k_diffusion = [
    ("Euler a", "sample_euler_ancestral", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
    ("Heun", "sample_heun", ["k_heun"], {"second_order": True}),
]
sampler_extra_params = {"sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"]}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion.external.CompVisDenoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


exec_shared("sd_samplers_kdiffusion", globals())
