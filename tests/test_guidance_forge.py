"""The Forge adapter on the stand-in host (tests/hosts/forge): one test per hook path."""
from __future__ import annotations

import pytest
import torch

from lib_merge.webui.guidance import controls as guidance_controls
from tests import hosts as host


@pytest.fixture
def forge():
    with host.installed("forge", fake_gradio=True):
        from modules import processing, shared

        runner, script, _ = host.guidance_runner("forge")
        yield _Host(shared, processing, runner, script)


class _Host:
    def __init__(self, shared, processing, runner, script):
        self.shared, self.processing, self.runner, self.script = shared, processing, runner, script

    @property
    def calls(self):
        return self.shared.sd_model.kmodel.calls

    def run(self, args, **p_kwargs):
        p = self.processing.StableDiffusionProcessingTxt2Img(**{"prompt": "a cat", "steps": 2, **p_kwargs})
        p.scripts = self.runner
        p.script_args = tuple(args)
        self.calls.clear()
        return p, self.processing.process_images(p)


def _ours(unet) -> dict:
    o = unet.model_options
    return {
        "post": len(o.get("sampler_post_cfg_function", [])),
        "pre": len(o.get("sampler_pre_cfg_function", [])),
        "cfg": "sampler_cfg_function" in o,
        "wrapper": "model_function_wrapper" in o,
        "attn1": sorted(o["transformer_options"].get("patches_replace", {}).get("attn1", {})),
        "output": len(o["transformer_options"].get("patches", {}).get("output_block_patch", [])),
    }


def test_clone_patch_and_assign(forge, capsys):
    original = forge.shared.sd_model.forge_objects_original.unet
    p, res = forge.run([{"pag_scale": 3, "seg_scale": 2, "freeu_enabled": True}], batch_size=2)
    patched = p.pbes_unets[0]
    assert patched is not original and patched.model is original.model  # a clone sharing the torch model
    assert _ours(original) == {"post": 0, "pre": 0, "cfg": False, "wrapper": False, "attn1": [], "output": 0}
    assert _ours(patched) == {"post": 1, "pre": 1, "cfg": True, "wrapper": True, "attn1": [("middle", 0, 0)], "output": 1}
    assert patched.model_options["disable_cfg1_optimization"] is True
    assert forge.calls == [8, 8]  # [u, c, c_pag, c_seg] x 2 images in Forge's own forward
    assert "2 model calls, 4.0 rows per image per call in 1.0 forward(s)" in capsys.readouterr().out
    assert "UG PAG scale: 3.0" in res.infotexts[0] and "UG FreeU: True" in res.infotexts[0]


def test_idempotent_over_the_three_hires_calls(forge):
    p, _ = forge.run([{"pag_scale": 3}], batch_size=1, enable_hr=True, hr_cfg=5.0)
    first, discarded, hires = p.pbes_unets
    assert discarded is first  # the hires pass's first call meets the txt2img clone: no second set of patches
    for unet in (first, hires):
        assert _ours(unet)["post"] == 1 and _ours(unet)["pre"] == 1
    assert hires is not first and hires.model_options["untitled_guidance"] != first.model_options["untitled_guidance"]
    assert forge.calls == [3, 3, 3, 3]  # every step, both passes: one forward with the PAG rows
    from lib_merge.webui.guidance import forge as adapter

    assert adapter._CELLS == {}  # postprocess_batch let go of the generation's state


def test_batched_forward_equals_separate_passes(forge):
    from backend import memory_management

    args = [{"pag_scale": 2.5, "seg_scale": 1.5, "seg_sigma": 1.0, "rescale_phi": 0.5}]
    _, batched = forge.run(args, seed=11)
    assert forge.calls == [4, 4]
    # Room for Forge's [u, c] but not for our four rows: the post-CFG function runs PAG and SEG alone.
    memory_management.free_memory_bytes = 4_000_000
    try:
        _, separate = forge.run(args, seed=11)
    finally:
        memory_management.free_memory_bytes = 1 << 40
    assert forge.calls == [2, 1, 1, 2, 1, 1]
    torch.testing.assert_close(batched.images, separate.images, atol=5e-4, rtol=1e-3)


def test_and_prompts_use_separate_passes(forge, capsys):
    _, res = forge.run([{"pag_scale": 2}], prompt="a cat AND a dog :0.5", batch_size=1)
    # Two cond entries, which Forge averages by strength: our perturbed copies run as a separate
    # calc_cond_uncond_batch over both entries (so D_pag is averaged the same way).
    assert forge.calls == [3, 2, 3, 2]
    assert "UG PAG scale: 2.0" in res.infotexts[0]


def test_untitled_drops_the_uncond_in_pre_cfg(forge):
    _, res = forge.run([{"untitled": "empty", "pag_scale": 3}], batch_size=2, cfg_scale=7.0, prompt="ignored")
    assert forge.calls == [4, 4]  # c and c_pag: the uncond is never computed
    assert "UG untitled: empty" in res.infotexts[0]


def test_freeu_output_block_patch(forge):
    _, plain = forge.run([{}], seed=5)
    _, neutral = forge.run([{"freeu_enabled": True, "freeu_b1": 1.0, "freeu_b2": 1.0, "freeu_s1": 1.0, "freeu_s2": 1.0}], seed=5)
    _, freeu = forge.run([{"freeu_enabled": True, "freeu_b1": 1.6, "freeu_s1": 0.3}], seed=5)
    torch.testing.assert_close(neutral.images, plain.images)
    assert not torch.allclose(freeu.images, plain.images)


def test_builtin_conflict_warning(forge, capsys):
    from modules import scripts

    class FreeUIntegrated(scripts.Script):
        def title(self):
            return "FreeU Integrated (SD 1.x, SD 2.x, SDXL)"

    builtin = FreeUIntegrated()
    forge.runner.add(builtin, 7)
    ours = [None] * len(guidance_controls.CONTROLS)
    ours[0] = {"freeu_enabled": True}
    forge.run(ours + [True, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0])
    out = capsys.readouterr().out
    assert out.count("Forge built-in also on") == 1 and "FreeU Integrated" in out
    forge.run(ours + [False, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0])
    assert "built-in" not in capsys.readouterr().out


def test_cfgpp_samplers_via_add_sampler(forge):
    from modules import sd_samplers

    assert {"Euler CFG++", "Euler a CFG++", "DPM++ 2M CFG++", "DDIM CFG++ (lambda)"} <= set(sd_samplers.all_samplers_map)
    _, res = forge.run([{"cfgpp": 0.6, "pag_scale": 2}], sampler_name="Euler CFG++", cfg_scale=1.0)
    assert torch.isfinite(res.images).all() and forge.calls == [3, 3]  # u is kept even at CFG 1: CFG++ renoises with it
    assert "Sampler: Euler CFG++" in res.infotexts[0]


def test_api_unknown_name_is_an_error_response(forge):
    from modules.api import api

    defaults = [c.default for c in guidance_controls.CONTROLS]
    req = {"prompt": "a cat", "steps": 2, "alwayson_scripts": {"untitled guidance": {"args": [{"seg_sigmaa": 2}]}}}
    status, body = api.text2imgapi(req, forge.runner, defaults)
    assert status == 500 and "seg_sigmaa" in body["errors"]
    req["alwayson_scripts"]["untitled guidance"]["args"] = [{"seg_scale": 2, "seg_sigma": "inf"}]
    status, body = api.text2imgapi(req, forge.runner, defaults)
    assert status == 200 and "UG SEG sigma: inf" in body["info"][0]


def test_hires_cfg_1_without_negative_prompt(forge, capsys):
    # Forge drops the hires negative at Hires CFG 1; CFG++ then takes the prompt as its uncond.
    _, res = forge.run([{"cfgpp": 0.5}], sampler_name="Euler CFG++", enable_hr=True, hr_cfg=1.0)
    assert torch.isfinite(res.images).all()
    assert capsys.readouterr().out.count("no negative prompt") == 1


def test_sdxl_dict_conditioning(forge):
    from tests.hosts.common.models import ForgeEngine

    forge.shared.sd_model = ForgeEngine("sdxl")
    _, res = forge.run([{"untitled": "zero", "pag_scale": 3, "seg_scale": 2}], batch_size=2)
    assert forge.calls == [6, 6]  # zero: c ≡ u, so c, c_pag, c_seg; crossattn and y (ADM) extended alike
    _, res = forge.run([{"untitled": "empty", "pag_scale": 3}], batch_size=1)
    assert forge.calls == [3, 3]  # SDXL zeroes an empty negative: c ≠ u, the uncond stays
    assert torch.isfinite(res.images).all()


# --- the perturbed rows, numerically (twins of test_guidance_hooks' PAG/SEG reference checks) ---


def _record_forwards(kmodel, monkeypatch):
    """Every apply_model call of the generation: (x, t, context, our row marks, output)."""
    from lib_merge.webui.guidance.forge_patches import ROWS_KEY

    seen = []
    plain = kmodel.apply_model

    def apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        marks = dict(transformer_options.get(ROWS_KEY) or {})
        out = plain(x, t, c_concat=c_concat, c_crossattn=c_crossattn, control=control, transformer_options=transformer_options, **kwargs)
        seen.append((x.clone(), t.clone(), c_crossattn.clone(), marks, out.detach().clone()))
        return out

    monkeypatch.setattr(kmodel, "apply_model", apply_model)
    return seen


def _reference_kmodel(kmodel, spec, perturb):
    """A copy of the model whose chosen attn1 modules are replaced per instance, outside Forge's patch path."""
    import copy

    from backend.modules.k_model import KModel

    from lib_merge.guidance import find_attention_layers

    unet = copy.deepcopy(kmodel.diffusion_model)
    for _, _, attn in find_attention_layers(unet, spec):
        perturb(attn)
    return KModel(unet)


def _projected_v(attn):
    import types

    attn.forward = types.MethodType(lambda self, x, context=None, mask=None: self.to_out(self.to_v(x)), attn)


def _blurred_queries(sigma, latent_hw):
    from lib_merge.guidance import blur_queries, feature_hw

    def perturb(attn):
        attn.to_q.register_forward_hook(lambda m, a, q: blur_queries(q, feature_hw(latent_hw, q.shape[1]), sigma))

    return perturb


def _check_perturbed_rows(seen, role, reference, plain):
    """The marked rows of each recorded forward equal ``reference`` on the same inputs, compared as
    the U-Net's ε output (x0 at a small σ hides the U-Net's part), and clearly differ from ``plain``."""
    checked = 0
    for x, t, ctx, marks, out in seen:
        rows = marks.get(role)
        if rows is None:
            continue
        sigma = t[rows].view(-1, 1, 1, 1)
        eps = lambda d: (x[rows] - d) / sigma
        with torch.no_grad():
            expected = eps(reference.apply_model(x[rows], t[rows], c_crossattn=ctx[rows]))
            unperturbed = eps(plain.apply_model(x[rows], t[rows], c_crossattn=ctx[rows]))
        got = eps(out[rows])
        error = (got - expected).abs().max().item()
        effect = (unperturbed - expected).abs().max().item()
        assert error < 1e-4 * max(1.0, expected.abs().max().item()), (role, error)
        assert effect > 100 * error + 1e-3, (role, effect)  # the perturbation is far above the match error
        checked += 1
    return checked


def _check_unmarked_rows(seen, plain):
    """Forge's own rows (u, c) in every forward are the unpatched model's output."""
    for x, t, ctx, marks, out in seen:
        starts = [r.start for k, r in marks.items() if isinstance(r, slice)]
        if None in starts:
            continue  # a separate perturbed pass: every row is ours
        rows = slice(0, min(starts, default=x.shape[0]))
        with torch.no_grad():
            torch.testing.assert_close(out[rows], plain.apply_model(x[rows], t[rows], c_crossattn=ctx[rows]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batched", [True, False])
def test_forge_pag_rows_equal_a_model_whose_attn1_returns_projected_v(forge, monkeypatch, batched):
    from backend import memory_management

    kmodel = forge.shared.sd_model.kmodel
    plain = _reference_kmodel(kmodel, "M00", lambda attn: None)
    reference = _reference_kmodel(kmodel, "all", _projected_v)
    seen = _record_forwards(kmodel, monkeypatch)
    if not batched:  # room for Forge's [u, c] only: PAG runs as its own calc_cond_uncond_batch
        monkeypatch.setattr(memory_management, "free_memory_bytes", 4_000_000)
    forge.run([{"pag_scale": 3, "pag_layers": "all"}], batch_size=2, width=64, height=32)
    assert _check_perturbed_rows(seen, "pag", reference, plain) == 2
    _check_unmarked_rows(seen, plain)


@pytest.mark.parametrize("sigma", [1.5, float("inf")])
@pytest.mark.parametrize("batched", [True, False])
def test_forge_seg_rows_equal_a_model_with_blurred_attn1_queries(forge, monkeypatch, batched, sigma):
    from backend import memory_management

    kmodel = forge.shared.sd_model.kmodel
    latent_hw = (4, 8)  # 32 x 64 px: a non-square grid
    plain = _reference_kmodel(kmodel, "M00", lambda attn: None)
    reference = _reference_kmodel(kmodel, "all", _blurred_queries(sigma, latent_hw))
    seen = _record_forwards(kmodel, monkeypatch)
    if not batched:
        monkeypatch.setattr(memory_management, "free_memory_bytes", 4_000_000)
    forge.run([{"seg_scale": 2, "seg_sigma": sigma, "seg_layers": "all"}], batch_size=2, width=64, height=32)
    assert _check_perturbed_rows(seen, "seg", reference, plain) == 2
    _check_unmarked_rows(seen, plain)
