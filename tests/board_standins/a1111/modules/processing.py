"""modules/processing.py of A1111 1.10: the order of the script hooks in process_images, the
LoRA built-in applying its weights in the first forward, the infotext."""
from dataclasses import dataclass
from typing import Any

import torch

from modules import shared
from tests.board_standins.common import Processed, create_infotext


@dataclass
class StableDiffusionProcessingTxt2Img:
    sd_model: Any = None
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    batch_size: int = 1
    n_iter: int = 1
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    override_settings: dict = None
    scripts: Any = None
    script_args: Any = None

    def __post_init__(self):
        self.extra_generation_params = self.extra_generation_params or {}

    def close(self):
        pass


def fingerprint(unet) -> float:
    """Stands in for an image: one number that depends on every weight."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in unet.parameters()))


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
    from PIL import Image

    value = fingerprint(model.model.diffusion_model)
    image = Image.new("RGB", (8, 8), (int(abs(value)) % 256, 0, 0))
    image.info["fingerprint"] = value
    res = Processed([image], [create_infotext(p)])
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
