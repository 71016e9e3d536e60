"""modules/processing.py (Forge): like A1111's, plus ``forge_objects`` resets. Per batch the U-Net
patcher is reset from ``forge_objects_original`` and then ``..._after_applying_lora``; ``sample``
resets it again right before ``process_before_every_sampling``; the hires pass calls that hook
once *before* its reset (those patches are discarded) and once after: three calls per image."""
from __future__ import annotations

import torch

from modules import prompt_parser, sd_samplers, shared
from tests.standins.a1111.modules.processing import ImageRNG, Processed, create_infotext


class StableDiffusionProcessingTxt2Img:
    def __init__(self, prompt="", negative_prompt="", seed=1, steps=4, cfg_scale=7.0, width=32, height=32, batch_size=1,
                 sampler_name="Euler", enable_hr=False, hr_scale=2.0, denoising_strength=0.5, hr_second_pass_steps=0,
                 hr_sampler_name=None, hr_cfg=1.0, s_min_uncond=0.0, eta=None, extra_generation_params=None):
        self.prompt, self.negative_prompt, self.seed, self.steps = prompt, negative_prompt, seed, steps
        self.cfg_scale, self.width, self.height, self.batch_size = cfg_scale, width, height, batch_size
        self.sampler_name, self.enable_hr, self.hr_scale, self.hr_cfg = sampler_name, enable_hr, hr_scale, hr_cfg
        self.denoising_strength, self.hr_second_pass_steps, self.hr_sampler_name = denoising_strength, hr_second_pass_steps, hr_sampler_name
        self.s_min_uncond, self.eta = s_min_uncond, eta
        self.extra_generation_params = extra_generation_params or {}
        self.scripts = None
        self.script_args = ()
        self.sampler = None
        self.is_hr_pass = False
        self.modified_noise = None
        self.pbes_unets = []  # the U-Net patcher seen by each process_before_every_sampling call

    @property
    def sd_model(self):
        return shared.sd_model

    def setup_prompts(self):
        self.all_prompts = [self.prompt] * self.batch_size
        self.all_negative_prompts = [self.negative_prompt] * self.batch_size
        self.all_seeds = [int(self.seed) + i for i in range(self.batch_size)]

    def _conds(self, width, height, with_uncond=True):
        uc = prompt_parser.get_learned_conditioning(
            self.sd_model, prompt_parser.SdConditioning(self.negative_prompts, is_negative_prompt=True, width=width, height=height), self.steps) if with_uncond else None
        c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, prompt_parser.SdConditioning(self.prompts, width=width, height=height), self.steps)
        return c, uc

    def txt2img_image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def _pbes(self, **kwargs):
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, **kwargs)
        self.pbes_unets.append(self.sd_model.forge_objects.unet)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self._pbes(x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        self.rng = ImageRNG(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        self.hr_c, self.hr_uc = self._conds(self.hr_upscale_to_x, self.hr_upscale_to_y, with_uncond=self.hr_cfg != 1)
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return samples


def process_images(p) -> Processed:
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    model = p.sd_model
    model.forge_objects = model.forge_objects_original.shallow_copy()
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.rng = ImageRNG((4, p.height // 8, p.width // 8), p.seeds)
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    p.c, p.uc = p._conds(p.width, p.height)
    samples = p.sample(p.c, p.uc, p.seeds, p.seeds, 0, p.prompts)
    if p.scripts is not None:
        p.scripts.postprocess_batch(p, samples, batch_number=0)
    return Processed(p, samples, [create_infotext(p, i) for i in range(len(p.all_prompts))])
