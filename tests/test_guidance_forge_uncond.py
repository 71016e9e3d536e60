"""Forge: the uncond a host sampler reads (issue 9, item 7), on the stand-in host (tests/hosts/forge).

Forge's own *DDIM CFG++* sets ``need_last_noise_uncond`` on the denoiser and renoises with
``(x − uncond_pred)/σ``; Forge uses the CFG value raw as λ, so at CFG 1 our pre-CFG function used to
drop the uncond and the sampler read zeros (``x/σ``). The stand-in has no DDIM CFG++, so the
denoiser is made to ask for the uncond the way that sampler does."""
from __future__ import annotations

import functools

import pytest
import torch

from tests import hosts as host


@pytest.fixture
def forge():
    with host.installed("forge", fake_gradio=True):
        from modules import processing, sd_samplers_cfg_denoiser

        runner, _, _ = host.guidance_runner("forge")
        yield processing, runner, sd_samplers_cfg_denoiser


def _uncond_read_by_the_sampler(forge, monkeypatch, args, **p_kwargs):
    """D_u the host sampler reads back from ``last_noise_uncond`` on each call."""
    processing, runner, cfg_denoiser = forge
    seen = []
    original_init, original = cfg_denoiser.CFGDenoiser.__init__, cfg_denoiser.CFGDenoiser.forward

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.need_last_noise_uncond = True  # DDIM CFG++ sets it before its first model call

    @functools.wraps(original)
    def forward(self, x, sigma, *rest, **kwargs):
        out = original(self, x, sigma, *rest, **kwargs)
        seen.append(x - sigma[:, None, None, None] * self.last_noise_uncond)
        return out

    monkeypatch.setattr(cfg_denoiser.CFGDenoiser, "__init__", __init__)
    monkeypatch.setattr(cfg_denoiser.CFGDenoiser, "forward", forward)
    p = processing.StableDiffusionProcessingTxt2Img(**{"prompt": "a cat", "steps": 2, "seed": 5, **p_kwargs})
    p.scripts, p.script_args = runner, tuple(args)
    processing.process_images(p)
    return seen


def test_a_host_sampler_reading_the_uncond_gets_the_real_one_at_cfg_1(forge, monkeypatch):
    read = _uncond_read_by_the_sampler(forge, monkeypatch, [{"pag_scale": 3}], cfg_scale=1.0)
    # At CFG 2 Forge runs the uncond whatever we plan; step 0 starts from the same seeded noise.
    reference = _uncond_read_by_the_sampler(forge, monkeypatch, [{"pag_scale": 3}], cfg_scale=2.0)
    torch.testing.assert_close(read[0], reference[0], atol=1e-5, rtol=1e-5)
    assert reference[0].abs().max() > 0.01


def test_with_untitled_c_equiv_u_forge_still_runs_the_uncond_the_sampler_reads(forge, monkeypatch):
    from modules import shared

    kmodel = shared.sd_model.kmodel
    kmodel.calls.clear()
    read = _uncond_read_by_the_sampler(forge, monkeypatch, [{"untitled": "empty", "pag_scale": 3}], cfg_scale=1.0)
    rows = list(kmodel.calls)
    # Untitled "empty" on SD1 is prompt "" and negative "": the uncond Forge itself runs for those.
    reference = _uncond_read_by_the_sampler(forge, monkeypatch, [{}], cfg_scale=2.0, prompt="", negative_prompt="")
    torch.testing.assert_close(read[0], reference[0], atol=1e-5, rtol=1e-5)
    assert rows == [3, 3]  # u, c, c_pag: Forge would hand the sampler zeros for a dropped uncond
