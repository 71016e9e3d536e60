# Follows modules/processing.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/processing.py (v1.10.1): the generation flow scripts see (before_process -> the model
loaded -> process -> init -> setup_conds -> sample, where ``process_before_every_sampling`` runs right
before each ``sampler.sample``/``sample_img2img`` with ``p.sampler`` created and the Lora built-in
applies its weights in the first forward, the hires pass, postprocess_batch, postprocess) and
``create_infotext``'s joining of ``extra_generation_params``. A weights-only model (the Merge Board's
loaded checkpoints) is not sampled: its image is its U-Net's fingerprint. Forge's stand-in imports
what Forge kept: ImageRNG, Processed, the StableDiffusionProcessing fields, prompts, conds and hires
set-up, create_infotext, decoding."""
from __future__ import annotations

import sys

import torch

from modules import infotext_utils, prompt_parser, sd_samplers, shared
from tests.hosts.common.webui import fingerprint, weights_image  # noqa: F401  (fingerprint: the board tests' image check)


class ImageRNG:
    """One generator per image seed, like modules/rng.ImageRNG (its numbers differ; ours are torch's)."""

    def __init__(self, shape, seeds):
        self.shape = shape
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.extra_generation_params = p.extra_generation_params


def weights_only(model) -> bool:
    return getattr(model, "weights_only", False)


def decode(model, samples, unet):
    """decode_latent_batch: the stand-in VAE is the identity (images are latents), except for a
    weights-only model, whose images are its U-Net's fingerprint."""
    return [weights_image(unet) for _ in range(samples.shape[0])] if weights_only(model) else samples


class StableDiffusionProcessing:
    """With the txt2img hires fields too (the hosts keep those on the subclass; we have only that one)."""

    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=1, steps=4, cfg_scale=7.0, width=32, height=32,
                 batch_size=1, n_iter=1, sampler_name="Euler", enable_hr=False, hr_scale=2.0, denoising_strength=0.5,
                 hr_second_pass_steps=0, hr_sampler_name=None, s_min_uncond=0.0, eta=None, extra_generation_params=None,
                 override_settings=None, do_not_save_samples=False, do_not_save_grid=False, scripts=None, script_args=()):
        self.prompt, self.negative_prompt, self.seed, self.steps = prompt, negative_prompt, seed, steps
        self.cfg_scale, self.width, self.height, self.batch_size = cfg_scale, width, height, batch_size
        self.sampler_name, self.enable_hr, self.hr_scale = sampler_name, enable_hr, hr_scale
        self.denoising_strength, self.hr_second_pass_steps, self.hr_sampler_name = denoising_strength, hr_second_pass_steps, hr_sampler_name
        self.s_min_uncond, self.eta = s_min_uncond, eta
        self.extra_generation_params = extra_generation_params or {}
        self.override_settings = override_settings or {}
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.scripts = scripts
        self.script_args = script_args
        self.sampler = None
        self.is_hr_pass = False
        self.is_api = False
        self.n_iter = n_iter
        self.iteration = 0

    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass  # as in v1.10.1: p always samples with shared.sd_model

    def close(self):
        self.sampler = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def setup_prompts(self):
        self.all_prompts = [self.prompt] * self.batch_size
        self.all_negative_prompts = [self.negative_prompt] * self.batch_size
        self.all_seeds = [int(self.seed) + i for i in range(self.batch_size)]

    def _conds(self, width, height, with_uncond=True):
        uc = prompt_parser.get_learned_conditioning(
            self.sd_model, prompt_parser.SdConditioning(self.negative_prompts, is_negative_prompt=True, width=width, height=height), self.steps) if with_uncond else None
        c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, prompt_parser.SdConditioning(self.prompts, width=width, height=height), self.steps)
        return c, uc

    def setup_conds(self):
        self.c, self.uc = self._conds(self.width, self.height)

    def txt2img_image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def _start_hr_pass(self, samples, with_uncond=True):
        """-> (upscaled samples, noise); sets the hires sampler, rng and ``hr_c``/``hr_uc``."""
        self.is_hr_pass = True
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        self.rng = ImageRNG(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        self.hr_c, self.hr_uc = self._conds(self.hr_upscale_to_x, self.hr_upscale_to_y, with_uncond)
        return samples, noise

    def _finish_hr_pass(self, samples, noise):
        """Sample at the hires size, then leave the hires pass."""
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc, steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        model = self.sd_model
        self.sampler = None if weights_only(model) else sd_samplers.create_sampler(self.sampler_name, model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        networks = sys.modules.get("networks")  # the Lora built-in, when the test loaded it
        if networks is not None:
            networks.apply_to(model.model.diffusion_model)  # its patched forwards, at the first step
        if self.sampler is None:
            return x
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        samples, noise = self._start_hr_pass(samples)
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self._finish_hr_pass(samples, noise)
        self.sampler = None
        return samples


def process_images(p) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    shared.sd_model  # noqa: B018  (reading it loads the selected checkpoint when none is loaded)
    return process_images_inner(p)


def process_images_inner(p) -> Processed:
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)  # the next call after process(), outside the runner
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.rng = ImageRNG((4, p.height // 8, p.width // 8), p.seeds)
    model = p.sd_model
    p.c = p.uc = None
    if not weights_only(model):
        p.setup_conds()
    samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.seeds, subseed_strength=0, prompts=p.prompts)
    if p.scripts is not None:
        p.scripts.postprocess_batch(p, samples, batch_number=0)
    res = Processed(p, decode(model, samples, model.model.diffusion_model), [create_infotext(p, i) for i in range(len(p.all_prompts))])
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


def create_infotext(p, index=0):
    generation_params = {
        "Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
        "Size": f"{p.width}x{p.height}", **p.extra_generation_params,
    }
    text = ", ".join([k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in generation_params.items() if v is not None])
    negative = f"\nNegative prompt: {p.all_negative_prompts[index]}" if p.all_negative_prompts[index] else ""
    return f"{p.all_prompts[index]}{negative}\n{text}".strip()
