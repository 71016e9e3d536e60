# Follows modules/sd_samplers_cfg_denoiser.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/sd_samplers_cfg_denoiser.py (Forge): CFGDenoiser.forward hands the reconstructed conds to
backend's sampling_function; hires CFG, "skip early CFG" and NGMS only change cond_scale."""
from backend.sampling.sampling_function import sampling_function
from modules import prompt_parser, sd_samplers_common
from modules import shared
from modules.shared import state
from tests.hosts.common.cfg_denoiser import CFGDenoiserCommon


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoiser(CFGDenoiserCommon):
    def combine_denoised(self, x_out, conds_list, uncond, cond_scale, timestep, x_in, cond):
        return self._combine_cfg(x_out, conds_list, uncond, cond_scale)

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        denoiser_params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        if self.p.is_hr_pass == True:  # noqa: E712
            cond_scale = self.p.hr_cfg
        if shared.opts.skip_early_cond > 0 and self.step / self.total_steps <= shared.opts.skip_early_cond:
            cond_scale = 1.0
        elif (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
        denoised, cond_pred, uncond_pred = sampling_function(self, denoiser_params=denoiser_params, cond_scale=cond_scale, cond_composition=cond_composition)
        if self.need_last_noise_uncond:
            self.last_noise_uncond = (x - uncond_pred) / sigma[:, None, None, None]
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised
