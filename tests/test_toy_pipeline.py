"""Toy family pipeline (issue 11 items 3, 4, 8): shards, deterministic training, the family on
disk in the SD1 layout, and the samplers checked against an exact reference."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from lib_merge.arch import detect_architecture
from lib_merge.guidance.cfgpp import sample_dpmpp_2m_cfgpp
from lib_merge.guidance.settings import GuidanceSettings
from lib_merge.io.reader import open_checkpoint
from lib_merge.toy import ToyConfig, build_toy_model
from lib_merge.toy.family import MANIFEST, PLANS, stage_files, train_family
from lib_merge.toy.model import toy_unet_config
from lib_merge.toy.sampling import discrete_sigmas, sample, sample_dpmpp_2m, sample_euler, sample_pixels
from lib_merge.toy.shards import AESTHETIC_SHARDS, DOMAIN_SHARDS, make_shard_batch
from lib_merge.toy.train import TrainConfig, train
from lib_merge.testing.denoiser import EpsDenoiser

TINY = ToyConfig(unet=toy_unet_config(8, (1, 2, 3, 3)), resolution=8)


def test_a_shard_stream_is_deterministic_inside_its_shard_and_the_training_split():
    shard = DOMAIN_SHARDS[0]
    a = make_shard_batch(12, seed=3, shard=shard, resolution=8)
    b = make_shard_batch(4, seed=3, shard=shard, resolution=8, start=8)
    assert torch.equal(a.images[8:], b.images) and a.attributes[8:] == b.attributes
    assert all(shard.contains(x) and x.split == "train" for x in a.attributes)
    other = make_shard_batch(12, seed=3, shard=AESTHETIC_SHARDS[1], resolution=8)
    assert all(x.palette == AESTHETIC_SHARDS[1].values[0] for x in other.attributes)
    assert not torch.equal(a.images, make_shard_batch(12, seed=4, shard=shard, resolution=8).images)


def test_training_is_deterministic_and_learns():
    config = TrainConfig(steps=16, batch=8, lr=3e-3, warmup=2)
    losses = []
    first = train(build_toy_model(0, TINY), config, stage="t", threads=1, progress=lambda s, loss: losses.append(loss))
    second = train(build_toy_model(0, TINY), config, stage="t", threads=1)
    for (k, v), w in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(v, w), k
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    other_stage = train(build_toy_model(0, TINY), replace(config, steps=2), stage="u", threads=1)
    assert not torch.equal(other_stage.unet.out[2].weight, first.unet.out[2].weight)


def _gaussian_denoiser(mu: float, s: float):
    # Exact x0-denoiser of data x0 ~ N(mu, s²) under x = x0 + σ·ε.
    return lambda x, sigma, **_: mu + (x - mu) * (s * s / (s * s + sigma[:, None, None, None] ** 2))


@pytest.mark.parametrize("solver,order", [("euler", 1), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_to_the_probability_flow_of_gaussian_data_at_their_order(solver, order):
    # For x0 ~ N(μ, s²) the probability-flow ODE is solved exactly: x(σ) − μ ∝ √(s² + σ²); the
    # last step (σ_min → 0) returns the denoiser's x̂0 at σ_min, as k-diffusion's samplers do.
    # Doubling the steps must divide the error by 2^order (Euler 1, DPM-Solver++(2M) 2).
    mu, s, low, high = 0.3, 0.5, 0.03, 14.6
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * high
    at_low = mu + (x_T - mu) * math.sqrt(s * s + low * low) / math.sqrt(s * s + high**2)
    expected = mu + (at_low - mu) * s * s / (s * s + low * low)
    fn = sample_euler if solver == "euler" else sample_dpmpp_2m
    errors = []
    for steps in (20, 40, 80):
        sigmas = torch.cat([torch.exp(torch.linspace(math.log(high), math.log(low), steps, dtype=torch.float64)),
                            torch.zeros(1, dtype=torch.float64)])
        errors.append(float((fn(_gaussian_denoiser(mu, s), x_T, sigmas) - expected).abs().max()))
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.85 * 2**order < coarse / fine < 1.15 * 2**order, errors
    assert errors[-1] < (0.04 if order == 1 else 1e-3)


def test_plain_dpmpp_2m_equals_the_cfgpp_form_when_both_predictions_agree():
    # With D_λ = D_u (no guidance) DPM++ 2M CFG++ reduces to plain DPM++ 2M: two independent codings.
    from lib_merge.guidance.cfgpp import CfgppState

    state = CfgppState()
    inner = _gaussian_denoiser(0.1, 0.7)

    def model(x, sigma, **kw):
        d = inner(x, sigma)
        state.record(d)
        return d

    sigmas = discrete_sigmas(EpsDenoiser(build_toy_model(0, TINY).unet), 8)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    assert torch.allclose(sample_dpmpp_2m(model, x, sigmas), sample_dpmpp_2m_cfgpp(model, x, sigmas, cfgpp_state=state), atol=1e-5)


def test_discrete_sigmas_span_the_sd_table():
    den = EpsDenoiser(build_toy_model(0, TINY).unet)
    sig = discrete_sigmas(den, 10)
    assert len(sig) == 11 and sig[-1] == 0
    assert math.isclose(float(sig[0]), den.sigma_max, rel_tol=1e-5) and math.isclose(float(sig[-2]), den.sigma_min, rel_tol=1e-5)
    assert bool((sig[:-1][1:] < sig[:-1][:-1]).all())


@pytest.fixture(scope="module")
def tiny_model():
    return build_toy_model(1, TINY)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_sampling_is_seeded_per_image(tiny_model, sampler):
    prompts = ["large red circle, centre, plain background, vivid outlined flat", "small blue square, left, dotted background, deep borderless shaded"]
    both = sample(tiny_model, prompts, seed=5, steps=3, sampler=sampler)
    assert both.dtype == torch.uint8 and both.shape == (2, 3, 8, 8)
    assert torch.equal(both, sample(tiny_model, prompts, seed=5, steps=3, sampler=sampler))
    if sampler != "euler_a":  # ancestral noise is drawn for the whole batch at once
        alone = sample(tiny_model, prompts[1:], seed=6, steps=3, sampler=sampler)
        assert torch.equal(both[1:], alone)


def test_guidance_settings_reach_the_samples(tiny_model):
    prompt = ["medium green ring, top, striped background, pastel outlined shaded"] * 2
    plain = sample_pixels(tiny_model, prompt, seed=0, steps=3, cfg_scale=1.0)
    for knobs in (dict(pag_scale=3.0), dict(seg_scale=3.0), dict(cfgpp=0.6), dict(freeu_enabled=True)):
        guided = sample_pixels(tiny_model, prompt, seed=0, steps=3, cfg_scale=1.0, settings=GuidanceSettings(**knobs))
        assert not torch.equal(plain, guided), knobs
    # Untitled empty at CFG 5: cond ≡ uncond, so CFG has nothing to push and the scale is moot.
    assert torch.equal(sample_pixels(tiny_model, ["", ""], seed=0, steps=3, cfg_scale=5.0, untitled="empty"),
                       sample_pixels(tiny_model, ["", ""], seed=0, steps=3, cfg_scale=1.0, untitled="empty"))
    assert not torch.equal(sample_pixels(tiny_model, ["", ""], seed=0, steps=3, untitled="gibberish"),
                           sample_pixels(tiny_model, ["", ""], seed=0, steps=3, untitled="empty"))


def test_the_family_is_written_in_the_sd1_layout_and_kept_when_unchanged(tmp_path):
    plan = replace(PLANS["quick"], model_channels=8, resolution=8, base_steps=2, shard_steps=1, batch=2)
    logs = []
    manifest = train_family(tmp_path, plan, threads=1, log=logs.append)
    assert set(manifest["models"]) == set(stage_files(plan)) and len(manifest["models"]) == 8
    assert manifest["models"]["paragon"]["steps"] == 3 * manifest["models"]["domain-round"]["steps"]
    for entry in manifest["models"].values():
        with open_checkpoint(tmp_path / entry["file"]) as reader:
            info = detect_architecture(reader.shapes(), reader.metadata)
        assert info.arch.name == "sd1" and len(info.arch.blocks) == 26
    assert json.loads((tmp_path / MANIFEST).read_text())["models"]["base"]["sha256"] == manifest["models"]["base"]["sha256"]
    logs.clear()
    again = train_family(tmp_path, plan, threads=1, log=logs.append)
    assert all("kept" in line for line in logs) and again["models"]["base"]["sha256"] == manifest["models"]["base"]["sha256"]
    # Longer fine-tunes retrain every fine-tune from the same base, which is kept.
    logs.clear()
    longer = train_family(tmp_path, replace(plan, shard_steps=2), threads=1, log=logs.append)
    assert [line.startswith("base: kept") for line in logs] == [True] + [False] * 7
    assert longer["models"]["base"]["sha256"] == manifest["models"]["base"]["sha256"]
    assert longer["models"]["paragon"]["sha256"] != manifest["models"]["paragon"]["sha256"]
