"""modules/processing.py (Forge): like A1111's, plus ``forge_objects`` resets and ``hr_cfg`` (no hires
uncond at 1). Per batch the U-Net patcher is reset from ``forge_objects_original`` and then
``..._after_applying_lora``; ``sample`` resets it again right before ``process_before_every_sampling``;
the hires pass calls that hook once *before* its reset (those patches are discarded) and once after:
three calls per image."""
from __future__ import annotations

from modules import sd_samplers
from tests.standins.a1111.modules.processing import ImageRNG, Processed, StableDiffusionProcessing, create_infotext


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *args, hr_cfg=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.hr_cfg = hr_cfg
        self.modified_noise = None
        self.pbes_unets = []  # the U-Net patcher seen by each process_before_every_sampling call

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
        return self.sample_hr_pass(samples) if self.enable_hr else samples

    def sample_hr_pass(self, samples):
        samples, noise = self._start_hr_pass(samples, with_uncond=self.hr_cfg != 1)
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        return self._finish_hr_pass(samples, noise)


def process_images(p) -> Processed:
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)  # the next call after process(), outside the runner
    model = p.sd_model
    model.forge_objects = model.forge_objects_original.shallow_copy()
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.rng = ImageRNG((4, p.height // 8, p.width // 8), p.seeds)
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()  # stands in for extra_networks.activate
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    p.setup_conds()
    samples = p.sample(p.c, p.uc, p.seeds, p.seeds, 0, p.prompts)
    if p.scripts is not None:
        p.scripts.postprocess_batch(p, samples, batch_number=0)
    return Processed(p, samples, [create_infotext(p, i) for i in range(len(p.all_prompts))])
