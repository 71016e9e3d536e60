"""The Forge adapter on the stand-in host (tests/standins/forge): one test per hook path."""
from __future__ import annotations

import pytest
import torch

from lib_merge.webui import guidance_controls
from tests.standins import host


@pytest.fixture
def forge():
    with host.installed("forge"):
        from modules import processing, scripts, shared

        from tests.standins.common.models import ForgeEngine

        shared.sd_model = ForgeEngine("sd1")
        script_module = host.load_script()
        script = script_module.UntitledGuidanceScript()
        script.filename = "untitled_guidance.py"
        runner = scripts.ScriptRunner()
        runner.add(script, len(guidance_controls.CONTROLS))
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
    from lib_merge.webui import forge as adapter

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
    from tests.standins.common.models import ForgeEngine

    forge.shared.sd_model = ForgeEngine("sdxl")
    _, res = forge.run([{"untitled": "zero", "pag_scale": 3, "seg_scale": 2}], batch_size=2)
    assert forge.calls == [6, 6]  # zero: c ≡ u, so c, c_pag, c_seg; crossattn and y (ADM) extended alike
    _, res = forge.run([{"untitled": "empty", "pag_scale": 3}], batch_size=1)
    assert forge.calls == [3, 3]  # SDXL zeroes an empty negative: c ≠ u, the uncond stays
    assert torch.isfinite(res.images).all()
