# Follows modules/processing.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/processing.py (Forge): like A1111's, plus ``forge_objects`` resets and ``hr_cfg`` (no hires
uncond at 1). Per batch the U-Net patcher is reset from ``forge_objects_original`` and then
``..._after_applying_lora``; ``sample`` resets it again right before ``process_before_every_sampling``;
the hires pass calls that hook once *before* its reset (those patches are discarded) and once after:
three calls per image. The model comes from ``sd_models.forge_model_reload`` (a new engine when the
loading parameters changed), the LoRA built-in clones the U-Net patcher when the set of LoRAs changed,
and loading the patcher for sampling refreshes its LoRA weights. A weights-only engine (the Merge
Board's loaded checkpoints) is not sampled: its image is its U-Net's fingerprint."""
from __future__ import annotations

from modules import sd_models, sd_samplers
from tests.hosts.a1111.modules.processing import (  # noqa: F401  (fingerprint: the board tests' image check)
    ImageRNG, Processed, StableDiffusionProcessing, create_infotext, decode, fingerprint, weights_only,
)

active_loras = []  # [(filename, {param name: delta})], set by the test (stands in for <lora:...> in the prompt)


def load_networks(sd):
    """extensions-builtin/sd_forge_lora/networks.load_networks: clone + add_patches when the set changed."""
    targets = str([(f, ) for f, _ in active_loras])
    if getattr(sd, "current_lora_hash", None) == targets:
        return
    sd.current_lora_hash = targets
    sd.forge_objects.unet = sd.forge_objects_original.unet
    for filename, deltas in active_loras:
        unet = sd.forge_objects.unet.clone()
        unet.add_patches(filename=filename, patches={k: ("diff", (v,)) for k, v in deltas.items()})
        sd.forge_objects.unet = unet
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()


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
        model = self.sd_model
        self.sampler = None if weights_only(model) else sd_samplers.create_sampler(self.sampler_name, model)
        x = self.rng.next()
        model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
        self._pbes(x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        model.forge_objects.unet.refresh_loras()  # sampling_prepare loads the patcher: its LoRA weights
        if self.sampler is None:
            return x
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x))
        return self.sample_hr_pass(samples) if self.enable_hr else samples

    def sample_hr_pass(self, samples):
        samples, noise = self._start_hr_pass(samples, with_uncond=self.hr_cfg != 1)
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self._pbes(x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        return self._finish_hr_pass(samples, noise)


def process_images(p) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    sd_models.forge_model_reload()  # manage_model_and_prompt_cache
    return process_images_inner(p)


def process_images_inner(p) -> Processed:
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)  # the next call after process(), outside the runner
    model = p.sd_model
    model.forge_objects = model.forge_objects_original.shallow_copy()
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.rng = ImageRNG((4, p.height // 8, p.width // 8), p.seeds)
    load_networks(model)  # extra_networks.activate
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    p.c = p.uc = None
    if not weights_only(model):
        p.setup_conds()
    samples = p.sample(p.c, p.uc, p.seeds, p.seeds, 0, p.prompts)
    if p.scripts is not None:
        p.scripts.postprocess_batch(p, samples, batch_number=0)
    res = Processed(p, decode(model, samples, model.forge_objects.unet.model.diffusion_model), [create_infotext(p, i) for i in range(len(p.all_prompts))])
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
