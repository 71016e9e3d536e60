"""modules/processing.py of Forge: model reload, per-batch forge_objects resets, the LoRA clone
from extra networks, process_before_every_sampling right before sampling, then the GPU load that
calls the patcher's refresh_loras(). The p and the image stand-in are shared with A1111
(../common.py)."""
from modules import sd_models
from tests.board_standins.common import Processed, StableDiffusionProcessingTxt2Img, create_infotext, fingerprint, processed_from  # noqa: F401

active_loras = []  # [(filename, {param name: delta})], set by the test (stands in for <lora:...> in the prompt)


def _load_networks(sd):
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


def process_images(p):
    p.sd_model, _ = sd_models.forge_model_reload()
    sd = p.sd_model
    if p.scripts is not None:
        p.scripts.process(p)
    sd.forge_objects = sd.forge_objects_original.shallow_copy()
    _load_networks(sd)
    sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
    # sample(): reset once more, then the hook, then sampling loads the patcher (LoRA refresh)
    sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
    if p.scripts is not None:
        p.scripts.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)
    sd.forge_objects.unet.refresh_loras()
    res = processed_from(p, sd.forge_objects.unet.model.diffusion_model)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
