"""Sampling a toy model through the project's own guidance stack.

The model call is the one the WebUI adapters make: a k-diffusion-style x₀ denoiser over the
ε-predicting U-Net (``testing.denoiser.EpsDenoiser``) wrapped in ``guidance.runner.GuidedDenoiser``,
which plans each step with ``GuidanceStack``, runs one batched forward with explicit rows and
installs the same PAG/SEG/NAG/FreeU hooks. CFG++ uses the samplers of ``guidance.cfgpp`` (the ones
the adapters register in both hosts); the plain samplers below follow k-diffusion's formulas.
Untitled modes are ``lib_merge.untitled``'s.

Noise is drawn per image from ``seed + i`` (A1111's convention), so image *i* is the same
whatever the batch size; ancestral noise comes from a generator seeded by ``seed``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..guidance.cfgpp import (
    get_ancestral_step, sample_ddim_cfgpp, sample_dpmpp_2m_cfgpp, sample_euler_ancestral_cfgpp, sample_euler_cfgpp,
)
from ..guidance.runner import GuidedDenoiser
from ..guidance.settings import GuidanceSettings
from ..guidance.stack import GuidanceStack
from ..testing.denoiser import EpsDenoiser
from ..untitled import gibberish_prompt, untitled_same_cond, zero_like_conditioning
from .model import ToyModel

SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "ddim")
UNTITLED = ("off", "empty", "zero", "gibberish")
GIBBERISH_WORDS = 8  # the toy tokenizer's context holds 14 words
# Where PAG and SEG perturb self-attention on a toy model. The WebUI default, SD1's middle block
# (M00), sees 8×8 tokens at 512 px; at 16×16 pixels it sees 2×2, where replacing attention by
# identity changes a sample by < 1e-3. IN05, the encoder's last attention at 8×8 tokens, is the
# toy's counterpart by token count.
TOY_PERTURBATION_LAYERS = "IN05"


def toy_guidance(**knobs) -> GuidanceSettings:
    """``GuidanceSettings`` for a toy model: PAG/SEG on ``TOY_PERTURBATION_LAYERS`` unless given."""
    knobs.setdefault("pag_layers", TOY_PERTURBATION_LAYERS)
    knobs.setdefault("seg_layers", TOY_PERTURBATION_LAYERS)
    return GuidanceSettings(**knobs)


def discrete_sigmas(denoiser: EpsDenoiser, steps: int) -> torch.Tensor:
    """k-diffusion's ``get_sigmas`` for a discrete model: ``steps`` timesteps evenly from the
    last to the first, σ by interpolation in log σ, then a final 0."""
    t = torch.linspace(len(denoiser.sigmas) - 1, 0, steps)
    lo, hi, frac = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - frac) * denoiser.log_sigmas[lo] + frac * denoiser.log_sigmas[hi]
    return torch.cat([log_sigma.exp(), torch.zeros(1)])


@torch.no_grad()
def sample_euler(model, x, sigmas, generator=None, eta=0.0):
    """Euler (η = 0) and Euler ancestral (η = 1) of k-diffusion; DDIM(η) in its σ form is the same
    update (x̂₀ plus the ε direction rescaled to σ_down, then σ_up of fresh noise)."""
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma * ones)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + torch.randn(x.shape, generator=generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. arXiv 2211.01095), k-diffusion's ``sample_dpmpp_2m``."""
    ones = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma * ones)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma / sigma_next)
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


def initial_noise(n: int, resolution: int, seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(3, resolution, resolution, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


def conditioning(model: ToyModel, prompts: Sequence[str], negatives: Sequence[str], untitled: str, seed: int):
    """(cond, uncond, same_cond) for a batch, with untitled's prompts and conditionings."""
    if untitled not in UNTITLED:
        raise ValueError(f"untitled={untitled!r}: choose one of {', '.join(UNTITLED)}")
    n = len(prompts)
    if untitled == "gibberish":
        prompts = [gibberish_prompt(seed + i, GIBBERISH_WORDS) for i in range(n)]
    elif untitled in ("empty", "zero"):
        prompts = [""] * n
    with torch.no_grad():
        cond = model.encode_prompts(list(prompts))
        uncond = model.encode_prompts(list(negatives))
    if untitled == "zero":
        cond = zero_like_conditioning(cond)
    same = untitled != "off" and untitled_same_cond(untitled, is_sdxl=False, cond=cond, uncond=uncond)
    return cond, uncond, same


def sample(model: ToyModel, prompts: Sequence[str], **options) -> torch.Tensor:
    """uint8 images (N, 3, R, R) for ``prompts``: ``sample_pixels`` clipped to [−1, 1] and quantised."""
    return to_uint8(sample_pixels(model, prompts, **options))


@torch.no_grad()
def sample_pixels(
    model: ToyModel,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int = 20,
    sampler: str = "euler",
    cfg_scale: float = 5.0,
    settings: Optional[GuidanceSettings] = None,
    negatives: Optional[Sequence[str]] = None,
    untitled: Optional[str] = None,
) -> torch.Tensor:
    """The sampler's final x (N, 3, R, R) in float, unclipped; ``settings`` are the guidance knobs
    (default: plain CFG at ``cfg_scale``), ``untitled`` overrides ``settings.untitled``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
    settings = settings or GuidanceSettings()
    untitled = settings.untitled if untitled is None else untitled
    negatives = list(negatives) if negatives is not None else [""] * len(prompts)
    cond, uncond, same = conditioning(model, prompts, negatives, untitled, seed)
    unet = model.unet
    denoiser = EpsDenoiser(unet)
    stack = GuidanceStack(settings, steps, cfg_scale=cfg_scale, untitled_same_cond=same)
    sigmas = discrete_sigmas(denoiser, steps)
    x = initial_noise(len(prompts), model.config.resolution, seed) * sigmas[0]
    generator = torch.Generator().manual_seed(seed)
    with GuidedDenoiser(denoiser, stack, diffusion_model=unet, cond=cond, uncond=uncond,
                        model_channels=unet.model_channels) as guided:
        if stack.cfgpp_on:
            state = guided.cfgpp_state
            if sampler == "euler":
                x = sample_euler_cfgpp(guided, x, sigmas, cfgpp_state=state)
            elif sampler == "euler_a":
                x = sample_euler_ancestral_cfgpp(guided, x, sigmas, generator=generator, cfgpp_state=state)
            elif sampler == "ddim":
                x = sample_ddim_cfgpp(guided, x, sigmas, cfgpp_state=state)
            else:
                x = sample_dpmpp_2m_cfgpp(guided, x, sigmas, cfgpp_state=state)
        elif sampler in ("euler", "ddim"):
            x = sample_euler(guided, x, sigmas)
        elif sampler == "euler_a":
            x = sample_euler(guided, x, sigmas, generator=generator, eta=1.0)
        else:
            x = sample_dpmpp_2m(guided, x, sigmas)
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
