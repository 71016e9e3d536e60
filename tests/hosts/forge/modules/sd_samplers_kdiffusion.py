# Follows modules/sd_samplers_kdiffusion.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/sd_samplers_kdiffusion.py (Forge): the inner model is a schedule linker whose
``inner_model`` is the ForgeDiffusionEngine; KDiffusionSampler is shared with A1111
(../../shared_src/sd_samplers_kdiffusion.py)."""
import k_diffusion.external

from modules import sd_samplers_cfg_denoiser, shared
from tests.hosts.common import exec_shared

samplers_k_diffusion = [
    ("Euler a", "sample_euler_ancestral", ["k_euler_a"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
]
sampler_extra_params = {}


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion.external.ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


exec_shared("sd_samplers_kdiffusion", globals())
