# Follows modules/sd_samplers_kdiffusion.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/sd_samplers_kdiffusion.py, the part A1111 v1.10.1 and Forge share: SamplerData for the
host's ``samplers_k_diffusion``, karras sigmas and KDiffusionSampler (funcname may be a callable,
as for Restart). Each host's module first sets ``samplers_k_diffusion``, ``sampler_extra_params``
and its own ``CFGDenoiserKDiffusion``, then runs this. Forge's sampling_prepare/cleanup and
predictor.noise_scaling are left out: for the stand-ins' ε-prediction they scale noise as A1111 does."""
# ruff: noqa: F821  (samplers_k_diffusion, sampler_extra_params and CFGDenoiserKDiffusion are set by the host module before it runs this)
import inspect

import k_diffusion.sampling
import torch

from modules import sd_samplers_common

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
    if callable(funcname) or hasattr(k_diffusion.sampling, funcname)
]


def karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.extra_params = sampler_extra_params.get(funcname, [])
        self.options = options or {}
        self.func = funcname if callable(funcname) else getattr(k_diffusion.sampling, self.funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return karras(steps, self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item())

    def _run(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning, steps):
        extra_params_kwargs = self.initialize(p)
        if "sigmas" in inspect.signature(self.func).parameters:
            extra_params_kwargs["sigmas"] = sigmas
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond,
        }
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state, **extra_params_kwargs))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        return self._run(p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning, steps)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        return self._run(p, xi, sigma_sched, conditioning, unconditional_conditioning, image_conditioning, t_enc + 1)
