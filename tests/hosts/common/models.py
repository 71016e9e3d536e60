# Follows ldm/models/diffusion/ddpm.py LatentDiffusion and modules/sd_models_xl.py of A1111 v1.10.1 (tag v1.10.1); backend/diffusion_engine of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""A deterministic fake text encoder and the host model objects wrapped around the tiny U-Net: A1111's
LatentDiffusion (ldm/models/diffusion/ddpm.py, sgm DiffusionEngine for SDXL) and Forge's engine."""
from __future__ import annotations

import hashlib

import torch

from lib_merge.testing.unet import UNetModel, make_tiny_unet, sd_discrete_sigmas, tiny_sdxl_config

TOKENS = 6


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class FakeTextEncoder:
    """Text -> conditioning, one deterministic tensor per prompt; counts calls (cache tests).

    SDXL flavour returns {"crossattn", "vector"} with the size embedding in vector[1280:], and zeros
    for an empty *negative* prompt, as both hosts' SDXL ``get_learned_conditioning`` do."""

    def __init__(self, context_dim: int, sdxl: bool = False, adm: int = 2816):
        self.context_dim, self.sdxl, self.adm = context_dim, sdxl, adm
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        rows = [torch.randn(TOKENS, self.context_dim, generator=torch.Generator().manual_seed(_seed(t))) for t in texts]
        context = torch.stack(rows)
        if not self.sdxl:
            return context
        width = getattr(texts, "width", 1024) or 1024
        height = getattr(texts, "height", 1024) or 1024
        pooled = torch.stack([torch.randn(1280, generator=torch.Generator().manual_seed(_seed(t) + 1)) for t in texts])
        size = torch.full((len(texts), self.adm - 1280), float(width + height) / 1000.0)
        vector = torch.cat([pooled, size], dim=1)
        if getattr(texts, "is_negative_prompt", False) and all(t == "" for t in texts):
            context, vector = torch.zeros_like(context), torch.cat([torch.zeros_like(pooled), size], dim=1)
        return {"crossattn": context, "vector": vector}


def make_unet(flavour: str, **overrides) -> UNetModel:
    if flavour == "sdxl":
        overrides.setdefault("adm_in_channels", 2816)
    return make_tiny_unet(flavour, **overrides)


def alphas_cumprod() -> torch.Tensor:
    sigmas = sd_discrete_sigmas()
    return 1.0 / (sigmas**2 + 1.0)


class _Holder:
    pass


class A1111Model:
    """``shared.sd_model`` of A1111: LatentDiffusion (SD1) or sgm DiffusionEngine (SDXL) in the parts the
    sampler loop and our adapter touch. ``apply_model(x, t, cond)`` follows ldm's DiffusionWrapper
    (``c_crossattn`` list concatenated; ``c_concat`` joined to x only for 9-channel inpainting
    U-Nets) and A1111's sd_models_xl.apply_model (``crossattn`` / ``vector`` dict)."""

    def __init__(self, flavour: str = "sd1", *, unet=None, **unet_overrides):
        self.is_sdxl = flavour == "sdxl"
        self.is_sd1 = not self.is_sdxl
        self.is_sd2 = False
        self.model = _Holder()
        self.model.diffusion_model = unet if unet is not None else make_unet(flavour, **unet_overrides)
        self.model.conditioning_key = "crossattn"
        self.cond_stage_key = "txt" if self.is_sdxl else "txt"
        self.parameterization = "eps"
        self.sd_model_hash = f"standin-{flavour}"
        self.alphas_cumprod = alphas_cumprod()
        dm = self.model.diffusion_model
        self.encoder = FakeTextEncoder(dm.config.context_dim, sdxl=self.is_sdxl, adm=dm.config.adm_in_channels or 2816)
        self.apply_calls = 0
        self.rows_seen: list[int] = []

    def get_learned_conditioning(self, texts):
        return self.encoder(texts)

    def apply_model(self, x, t, cond):
        dm = self.model.diffusion_model
        self.apply_calls += 1
        self.rows_seen.append(x.shape[0])
        if self.is_sdxl:
            if dm.in_channels > x.shape[1]:
                x = torch.cat([x] + cond["c_concat"], dim=1)
            return dm(x, t, context=cond["crossattn"], y=cond["vector"])
        if dm.in_channels > x.shape[1]:
            x = torch.cat([x] + cond["c_concat"], dim=1)
        return dm(x, t, context=torch.cat(cond["c_crossattn"], 1))


def ForgeEngine(flavour: str = "sd1", **unet_overrides):
    """Forge's ForgeDiffusionEngine (backend/diffusion_engine/base.py) around the tiny integrated
    U-Net, fp32, with the fake text encoder. Call under the Forge stand-in host only."""
    from backend.diffusion_engine.base import ForgeDiffusionEngine
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from lib_merge.testing.unet import tiny_sd1_config

    if flavour == "sdxl":
        unet_overrides.setdefault("adm_in_channels", 2816)
        config = tiny_sdxl_config(**unet_overrides)
    else:
        config = tiny_sd1_config(**unet_overrides)
    torch.manual_seed(0)
    unet = IntegratedUNet2DConditionModel(config).eval()
    engine = ForgeDiffusionEngine(unet, torch.float32, encoder=FakeTextEncoder(config.context_dim, sdxl=flavour == "sdxl", adm=config.adm_in_channels or 2816))
    engine.is_sdxl = flavour == "sdxl"
    engine.is_sd1 = not engine.is_sdxl
    engine.sd_model_hash = f"forge-standin-{flavour}"
    return engine
