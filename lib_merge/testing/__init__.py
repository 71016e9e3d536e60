"""Test and benchmark helpers that need no WebUI: a tiny ldm-layout U-Net and a k-diffusion wrapper."""
from .denoiser import EpsDenoiser
from .samplers import sample_heun
from .schedules import karras_sigmas, sd_discrete_sigmas
from .unet import (
    UNetConfig,
    UNetModel,
    make_tiny_unet,
    random_conditioning,
    sd1_config,
    sdxl_config,
    tiny_sd1_config,
    tiny_sdxl_config,
)

__all__ = [
    "EpsDenoiser", "UNetConfig", "UNetModel", "karras_sigmas", "make_tiny_unet", "random_conditioning", "sample_heun", "sd1_config", "sd_discrete_sigmas",
    "sdxl_config",
    "tiny_sd1_config", "tiny_sdxl_config",
]
