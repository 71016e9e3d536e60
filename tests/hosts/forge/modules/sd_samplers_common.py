# Follows modules/sd_samplers_common.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
from tests.hosts.a1111.modules.sd_samplers_common import *  # noqa: F401,F403  (identical in Forge in the parts we use)
from tests.hosts.a1111.modules.sd_samplers_common import SamplerData, Sampler, setup_img2img_steps, InterruptedException, apply_refiner, TorchHijack  # noqa: F401,E402
