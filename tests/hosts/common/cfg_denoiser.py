# Follows modules/sd_samplers_cfg_denoiser.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike in these parts.
"""What Forge kept of A1111 v1.10.1's ``CFGDenoiser`` (modules/sd_samplers_cfg_denoiser.py): the
state ``__init__`` sets and the CFG combine, uncond + Σ weight·scale·(cond_i − uncond) over the
``conds_list`` rows. Each host's ``CFGDenoiser`` builds on it with its own ``forward`` and
``combine_denoised`` signature (Forge's takes ``timestep, x_in, cond`` too); no host state here."""
import torch


class CFGDenoiserCommon(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None

    @property
    def inner_model(self):
        raise NotImplementedError()

    def _combine_cfg(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised
