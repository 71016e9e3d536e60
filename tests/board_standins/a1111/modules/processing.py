"""modules/processing.py of A1111 1.10: the order of the script hooks in process_images, the
LoRA built-in applying its weights in the first forward. The p and the image stand-in are shared
with Forge (../common.py)."""
from modules import shared
from tests.board_standins.common import Processed, StableDiffusionProcessingTxt2Img, create_infotext, fingerprint, processed_from  # noqa: F401


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    model = shared.sd_model
    p.sd_model = model
    if p.scripts is not None:
        p.scripts.process(p)
    if p.scripts is not None:  # sample(): right before sampler.sample
        p.scripts.process_before_every_sampling(p, x=None, noise=None, c=None, uc=None)
    try:
        import networks  # the Lora built-in, when the test installed it

        networks.apply_to(model.model.diffusion_model)  # its patched forward, before the first step
    except ImportError:
        pass
    res = processed_from(p, model.model.diffusion_model)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
