"""The A1111 adapter on the stand-in host (tests/hosts/a1111): one test per hook path."""
from __future__ import annotations

import math

import pytest
import torch

from lib_merge.guidance.runner import GuidedDenoiser
from lib_merge.guidance.settings import GuidanceSettings
from lib_merge.guidance.stack import GuidanceStack
from lib_merge.webui.guidance import args as guidance_args, controls as guidance_controls, ui as guidance_ui, xyz as xyz_guidance
from tests import hosts as host


@pytest.fixture
def a1111():
    with host.installed("a1111", fake_gradio=True):
        from modules import processing, shared

        runner, script, script_module = host.guidance_runner("a1111")
        yield _Host(shared, processing, runner, script, script_module)


class _Host:
    def __init__(self, shared, processing, runner, script, script_module):
        self.shared, self.processing, self.runner, self.script, self.script_module = shared, processing, runner, script, script_module

    def run(self, args, **p_kwargs):
        p = self.processing.StableDiffusionProcessingTxt2Img(**{"prompt": "a cat", "steps": 2, "width": 32, "height": 32, **p_kwargs})
        p.scripts = self.runner
        p.script_args = tuple(args)
        return p, self.processing.process_images(p)


def _attention_hooks(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def _prepared(host_, settings, *, prompt="a cat", batch_size=2, sampler="Euler", **p_kwargs):
    """A p with conds and a sampler, after our process_before_every_sampling."""
    from modules import sd_samplers

    from lib_merge.webui.guidance import a1111

    p = host_.processing.StableDiffusionProcessingTxt2Img(prompt=prompt, batch_size=batch_size, steps=4, width=32, height=32, **p_kwargs)
    p.setup_prompts()
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.setup_conds()
    p.sampler = sd_samplers.create_sampler(sampler, host_.shared.sd_model)
    guided = a1111.prepare_sampling(p, settings)
    den = p.sampler.model_wrap_cfg
    den.p, den.steps, den.total_steps, den.step = p, 4, 4, 0
    return p, den, guided


def _reference(host_, p, settings, x, sigma, image_cond, cfg_scale):
    """The same step with one forward per role through the host-free reference runner."""
    from k_diffusion.external import CompVisDenoiser
    from modules import prompt_parser

    model = host_.shared.sd_model
    compvis = CompVisDenoiser(model)
    conds_list, cond = prompt_parser.reconstruct_multicond_batch(p.c, 0)
    uncond = prompt_parser.reconstruct_cond_batch(p.uc, 0)
    n_img = x.shape[0]

    def inner(xs, sigmas, cond):
        rows = xs.shape[0]
        ctx = cond if isinstance(cond, dict) else {"c_crossattn": [cond]}
        img = image_cond.repeat(rows // n_img, 1, 1, 1) if rows % n_img == 0 else image_cond[:1].expand(rows, -1, -1, -1)
        return compvis(xs, sigmas, cond={**ctx, "c_concat": [img]})

    stack = GuidanceStack(settings, 4, cfg_scale=cfg_scale)
    with GuidedDenoiser(inner, stack, diffusion_model=model.model.diffusion_model, cond=cond, uncond=uncond,
                        conds_list=conds_list, batched=False) as ref:
        return ref(x, sigma)


# ---------------------------------------------------------------------------------------- tests

def test_cfgpp_samplers_are_registered_once(a1111):
    from modules import sd_samplers

    from lib_merge.webui.guidance import a1111 as adapter
    from lib_merge.webui.guidance import cfgpp_samplers

    names = adapter.register_samplers()  # the script already registered at import: this is a re-run
    assert names == list(cfgpp_samplers.CFGPP_SAMPLERS)
    listed = [s.name for s in sd_samplers.all_samplers]
    for name in names:
        assert listed.count(name) == 1 and name in sd_samplers.all_samplers_map
        assert sd_samplers.samplers_map[name.lower()] == name
    assert sd_samplers.samplers_map["k_euler_a_cfgpp"] == "Euler a CFG++"
    assert sd_samplers.get_sampler_and_scheduler("Euler CFG++", None)[0] == "Euler CFG++"
    ddim = sd_samplers.create_sampler("DDIM CFG++ (lambda)", a1111.shared.sd_model)
    assert ddim.eta_option_field == "eta_ddim" and ddim.config.name == "DDIM CFG++ (lambda)"


def test_one_batched_forward_per_step_and_infotext(a1111, capsys):
    model = a1111.shared.sd_model
    p, res = a1111.run([{"pag_scale": 3, "seg_scale": 2}], batch_size=2)
    assert model.rows_seen == [8, 8]  # [c, u, c_pag, c_seg] x 2 images, one forward per step
    assert "PAG 3 (M00), SEG 2 (σ ∞, M00): 2 model calls, 4.0 rows per image per call in 1.0 forward(s)" in capsys.readouterr().out
    assert _attention_hooks(model.model.diffusion_model) == 0
    assert "UG PAG scale: 3.0" in res.infotexts[0] and "UG SEG sigma: inf" in res.infotexts[0]
    assert "forward" not in p.sampler.__dict__ if p.sampler is not None else True


def test_batched_forward_equals_separate_forwards_with_and_prompts(a1111):
    settings = GuidanceSettings(pag_scale=2.0, seg_scale=1.5, seg_sigma=2.0, rescale_phi=0.5)
    p, den, _ = _prepared(a1111, settings, prompt="a red cat AND a blue dog :0.5", batch_size=3)
    torch.manual_seed(3)
    x, sigma = torch.randn(3, 4, 4, 4) * 5.0, torch.full((3,), 5.0)
    image_cond = torch.zeros(3, 5, 1, 1)
    model = a1111.shared.sd_model
    model.rows_seen.clear()
    with torch.no_grad():
        out = den(x, sigma, cond=p.c, uncond=p.uc, cond_scale=7.0, s_min_uncond=0.0, image_cond=image_cond)
    assert model.rows_seen == [6 + 3 + 6 + 6]  # 2 sub-prompts x 3 images, uncond, PAG and SEG copies
    with torch.no_grad():
        ref = _reference(a1111, p, settings, x, sigma, image_cond, 7.0)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3)


def test_sdxl_dict_conds_and_inpainting_image_cond(a1111):
    from tests.hosts.common.models import A1111Model

    a1111.shared.sd_model = A1111Model("sdxl", in_channels=9)
    settings = GuidanceSettings(pag_scale=2.0, seg_scale=1.0)
    p, den, _ = _prepared(a1111, settings, batch_size=2)
    torch.manual_seed(4)
    x, sigma = torch.randn(2, 4, 4, 4) * 3.0, torch.full((2,), 3.0)
    image_cond = torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        out = den(x, sigma, cond=p.c, uncond=p.uc, cond_scale=5.0, s_min_uncond=0.0, image_cond=image_cond)
    assert a1111.shared.sd_model.rows_seen == [8]
    with torch.no_grad():
        ref = _reference(a1111, p, settings, x, sigma, image_cond, 5.0)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3)


def test_untitled_skips_the_uncond_rows_and_caches_its_conds(a1111):
    model = a1111.shared.sd_model
    p, res = a1111.run([{"untitled": "empty", "pag_scale": 3}], batch_size=2, cfg_scale=1.0, prompt="ignored")
    assert model.rows_seen == [4, 4]  # c and c_pag only: 2 rows per image
    calls = model.encoder.calls
    model.rows_seen.clear()
    a1111.run([{"untitled": "empty", "pag_scale": 3}], batch_size=2, cfg_scale=7.0, prompt="other")
    assert model.rows_seen == [4, 4]  # c ≡ u: CFG has nothing to do at any scale
    assert model.encoder.calls == calls + 2  # the host's own prompt/negative only; ours came from the cache
    assert "UG untitled: empty" in res.infotexts[0]


def test_untitled_conditioning_modes(a1111):
    from tests.hosts.common.models import A1111Model

    from lib_merge.webui.guidance import untitled_conds

    model = a1111.shared.sd_model
    c, uc = untitled_conds.compute_untitled_conds(model, "gibberish", [7, 8], width=64, height=64, steps=4)
    c2, _ = untitled_conds.compute_untitled_conds(model, "gibberish", [7, 8], width=64, height=64, steps=4)
    assert c is c2 and len(c.batch) == 2
    a, b = (c.batch[i][0].schedules[0].cond for i in range(2))
    assert not torch.equal(a, b)  # one gibberish prompt per seed
    xl = A1111Model("sdxl")
    c, uc = untitled_conds.compute_untitled_conds(xl, "zero", [1], width=1024, height=768, steps=4)
    vec = c.batch[0][0].schedules[0].cond["vector"]
    assert torch.count_nonzero(c.batch[0][0].schedules[0].cond["crossattn"]) == 0
    assert torch.count_nonzero(vec[:1280]) == 0 and torch.all(vec[1280:] == (1024 + 768) / 1000.0)  # sizes kept
    c, uc = untitled_conds.compute_untitled_conds(xl, "empty", [1], width=1024, height=1024, steps=4)
    assert torch.count_nonzero(uc[0][0].cond["crossattn"]) == 0 < torch.count_nonzero(c.batch[0][0].schedules[0].cond["crossattn"])


def test_chunked_rows_and_host_skipped_uncond(a1111):
    settings = GuidanceSettings(pag_scale=2.0)
    a1111.shared.opts.batch_cond_uncond = False
    p, den, _ = _prepared(a1111, settings, batch_size=2)
    torch.manual_seed(5)
    x, sigma = torch.randn(2, 4, 4, 4) * 4.0, torch.full((2,), 4.0)
    image_cond = torch.zeros(2, 5, 1, 1)
    model = a1111.shared.sd_model
    model.rows_seen.clear()
    with torch.no_grad():
        out = den(x, sigma, cond=p.c, uncond=p.uc, cond_scale=6.0, s_min_uncond=0.0, image_cond=image_cond)
    assert model.rows_seen == [4, 2]  # the cond chunk carries its PAG copies; the uncond chunk alone
    with torch.no_grad():
        ref = _reference(a1111, p, settings, x, sigma, image_cond, 6.0)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3)
    # NGMS: the host drops the uncond rows (odd step, sigma below s_min_uncond) and combines at scale 1.
    a1111.shared.opts.batch_cond_uncond = True
    den.step = 1
    model.rows_seen.clear()
    with torch.no_grad():
        out = den(x, sigma, cond=p.c, uncond=p.uc, cond_scale=6.0, s_min_uncond=10.0, image_cond=image_cond)
    assert model.rows_seen == [4]
    with torch.no_grad():
        ref = _reference(a1111, p, settings, x, sigma, image_cond, 1.0)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3)


def test_hooks_are_removed_even_when_the_model_fails(a1111):
    unet = a1111.shared.sd_model.model.diffusion_model
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("model failure")

    handle = unet.output_blocks[-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="model failure"):
            a1111.run([{"pag_scale": 3, "seg_scale": 3, "freeu_enabled": True}], batch_size=1)
    finally:
        handle.remove()
    assert _attention_hooks(unet) == 0


def test_freeu_pre_hooks_on_output_blocks(a1111):
    model = a1111.shared.sd_model
    _, plain = a1111.run([{}], batch_size=1, seed=3)
    _, neutral = a1111.run([{"freeu_enabled": True, "freeu_b1": 1.0, "freeu_b2": 1.0, "freeu_s1": 1.0, "freeu_s2": 1.0}], batch_size=1, seed=3)
    _, freeu = a1111.run([{"freeu_enabled": True, "freeu_b1": 1.6, "freeu_s2": 0.3}], batch_size=1, seed=3)
    torch.testing.assert_close(neutral.images, plain.images)
    assert not torch.allclose(freeu.images, plain.images)
    assert _attention_hooks(model.model.diffusion_model) == 0


def test_timestep_sampler_combines_in_x0(a1111):
    settings = GuidanceSettings(pag_scale=2.0, rescale_phi=0.6)
    p, den, _ = _prepared(a1111, settings, batch_size=2, sampler="DDIM")
    torch.manual_seed(6)
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 600.0)
    with torch.no_grad():
        eps = den(x, t, cond=p.c, uncond=p.uc, cond_scale=5.0, s_min_uncond=0.0, image_cond=torch.zeros(2, 5, 1, 1))
    # The same step as a k-diffusion (x0) step: x/√ᾱ at σ = √((1−ᾱ)/ᾱ), then back to ε.
    a = a1111.shared.sd_model.alphas_cumprod[600]
    sigma = ((1 - a) / a).sqrt()
    with torch.no_grad():
        d = _reference(a1111, p, settings, x / a.sqrt(), torch.full((2,), float(sigma)), torch.zeros(2, 5, 1, 1), 5.0)
    torch.testing.assert_close(eps, (x - a.sqrt() * d) / (1 - a).sqrt(), atol=5e-4, rtol=1e-3)


def test_cfgpp_sampler_renoises_with_the_uncond(a1111):
    from k_diffusion.external import CompVisDenoiser
    from modules import prompt_parser

    from lib_merge.webui.guidance import cfgpp_samplers

    settings = GuidanceSettings(cfgpp=0.4)
    p, den, guided = _prepared(a1111, settings, batch_size=1, sampler="Euler CFG++")
    torch.manual_seed(7)
    x = torch.randn(1, 4, 4, 4) * 5.0
    extra = dict(cond=p.c, uncond=p.uc, cond_scale=7.0, s_min_uncond=0.0, image_cond=torch.zeros(1, 5, 1, 1))
    with torch.no_grad():
        out = cfgpp_samplers.sample_euler_cfgpp(den, x, torch.tensor([5.0, 2.0]), extra_args=extra)
        compvis = CompVisDenoiser(a1111.shared.sd_model)
        s = torch.full((1,), 5.0)
        _, c = prompt_parser.reconstruct_multicond_batch(p.c, 0)
        d_c = compvis(x, s, cond={"c_crossattn": [c], "c_concat": [extra["image_cond"]]})
        d_u = compvis(x, s, cond={"c_crossattn": [prompt_parser.reconstruct_cond_batch(p.uc, 0)], "c_concat": [extra["image_cond"]]})
    d_lam = d_u + 0.4 * (d_c - d_u)
    torch.testing.assert_close(out, d_lam + (2.0 / 5.0) * (x - d_u), atol=5e-4, rtol=1e-3)
    # A full generation with a CFG++ sampler and PAG runs, and names it in the infotext.
    _, res = a1111.run([{"cfgpp": 0.5, "pag_scale": 2}], sampler_name="Euler a CFG++")
    assert "Sampler: Euler a CFG++" in res.infotexts[0] and "UG CFGpp lambda: 0.5" in res.infotexts[0]


def test_cfgpp_with_another_sampler_is_skipped_with_one_line(a1111, capsys):
    model = a1111.shared.sd_model
    a1111.run([{"cfgpp": 0.5}], sampler_name="Euler", batch_size=1)
    out = capsys.readouterr().out
    assert out.count("CFG++ skipped") == 1 and "Euler CFG++" in out
    assert model.rows_seen == [2, 2]


def test_api_dict_positional_and_unknown_name_error(a1111):
    from modules.api import api

    defaults = [c.default for c in guidance_controls.CONTROLS]  # what init_default_script_args reads from ui()
    req = {"prompt": "a cat", "steps": 2, "batch_size": 1}
    settings = {"pag_scale": 2, "untitled": "zero"}
    status, body = api.text2imgapi({**req, "alwayson_scripts": {"untitled guidance": {"args": [settings]}}}, a1111.runner, defaults)
    assert status == 200 and "UG PAG scale: 2.0" in body["info"][0] and "UG untitled: zero" in body["info"][0]
    values = guidance_args.controls_from_mapping(settings)
    positional = [values[c.name] for c in guidance_controls.CONTROLS]
    status2, body2 = api.text2imgapi({**req, "alwayson_scripts": {"untitled guidance": {"args": positional}}}, a1111.runner, defaults)
    assert status2 == 200 and body2["info"] == body["info"]
    torch.testing.assert_close(body2["images"], body["images"])
    status, body = api.text2imgapi({**req, "alwayson_scripts": {"untitled guidance": {"args": [{"pag_scal": 3}]}}}, a1111.runner, defaults)
    assert status == 500 and body["error"] == "BadParameterError" and "pag_scal" in body["errors"]


def test_xyz_axes_give_each_cell_its_value_and_infotext(a1111):
    from modules import script_callbacks

    xyz = host.load_xyz_grid()
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()  # Reload UI runs it again: no duplicates
    labels = [o.label for o in xyz.axis_options]
    assert labels.count(xyz_guidance.axis_label("pag_scale")) == 1 and len(labels) == 2 + len(xyz_guidance.AXES)
    opt = next(o for o in xyz.axis_options if o.label == xyz_guidance.axis_label("pag_scale"))
    p = a1111.processing.StableDiffusionProcessingTxt2Img(prompt="a cat", steps=2)
    p.scripts, p.script_args = a1111.runner, ({"pag_scale": 1.0},)
    cells = xyz.run_axis(p, opt, "0, 2.5")
    label = xyz_guidance.axis_label("pag_scale")
    assert [c[2] for c in cells] == [f"{label}: 0.0", f"{label}: 2.5"]
    assert "UG PAG" not in cells[0][1].infotexts[0] and "UG PAG scale: 2.5" in cells[1][1].infotexts[0]
    assert cells[0][0].extra_generation_params is p.extra_generation_params  # shared dict, rewritten per cell
    with pytest.raises(Exception, match="pag_scale"):
        xyz.run_axis(p, opt, "500")


def test_bad_inputs_skip_the_method_with_one_line(a1111, capsys):
    from modules import sd_unet

    from tests.hosts.common.models import A1111Model

    model = a1111.shared.sd_model
    a1111.run([{"pag_scale": 3, "pag_layers": "IN99"}], batch_size=1)
    assert "PAG skipped" in capsys.readouterr().out and model.rows_seen == [2, 2]
    a1111.shared.sd_model = A1111Model("sd1", transformer_depth_middle=0)  # a middle block without attention
    a1111.run([{"seg_scale": 3}], batch_size=1)
    assert "SEG skipped" in capsys.readouterr().out
    a1111.shared.sd_model = model
    sd_unet.current_unet = object()
    model.rows_seen.clear()
    a1111.run([{"pag_scale": 3, "freeu_enabled": True}], batch_size=1)
    assert "replacement U-Net" in capsys.readouterr().out and model.rows_seen == [2, 2]
    sd_unet.current_unet = None
    model.cond_stage_key = "edit"
    p, den, guided = _prepared(a1111, GuidanceSettings(pag_scale=2.0, freeu_enabled=True), batch_size=1)
    assert guided.settings.freeu_enabled and not guided.settings.pag_on and not guided.rows_enabled
    model.cond_stage_key = "txt"

    class NoHook:
        pass

    p = a1111.processing.StableDiffusionProcessingTxt2Img()
    p.sampler = NoHook()
    from lib_merge.webui.guidance import a1111 as adapter

    assert adapter.prepare_sampling(p, GuidanceSettings(pag_scale=2.0)) is None
    assert "no p.sampler.model_wrap_cfg" in capsys.readouterr().out


def test_script_ui_and_paste_of_the_seed_infotext(a1111):
    from modules import infotext_utils

    import gradio as gr

    with gr.Blocks():  # the host calls ui() inside its Blocks (the conflict line's events need one)
        components = a1111.script.ui(False)
    assert len(components) == len(guidance_controls.CONTROLS)
    assert a1111.script.paste_field_names == guidance_ui.send_to_names()
    params = infotext_utils.parse_generation_parameters(
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 4, Seed: 1, Size: 512x512, "
        "SEG Blur Sigma: 11, SEG Start Step: 0, SEG End Step: 2048, PAG Active: True, PAG SANF: True, PAG Scale: 1"
    )
    updates = dict(zip(guidance_controls.CONTROL_NAMES, infotext_utils.paste_values(a1111.script.infotext_fields, params)))
    assert updates["pag_enabled"] == {"value": True} and updates["pag_scale"] == {"value": 1.0}
    assert updates["seg_enabled"] == {"value": True} and updates["seg_scale"] == {"value": 3.0}
    assert updates["seg_sigma_inf"] == {"value": True} and updates["untitled"] == {"value": "off"}
    assert math.isclose(updates["pag_end"]["value"], 2048.0)


def test_cfgpp_sampler_without_the_script_drives_itself(a1111, capsys):
    p = a1111.processing.StableDiffusionProcessingTxt2Img(prompt="a cat", steps=2, width=32, height=32, cfg_scale=5.0,
                                                          sampler_name="DPM++ 2M CFG++")
    res = a1111.processing.process_images(p)  # p.scripts is None: nothing installed the guidance
    assert torch.isfinite(res.images).all()
    assert "λ = CFG scale / 12.5 = 0.400" in capsys.readouterr().out


# --- issue 9: who reads the uncond (7a), host DDIM CFG++ with dynthres (6), refiner (8) -------


def test_host_ddim_cfgpp_at_cfg_12_5_renoises_with_the_real_uncond(a1111):
    from modules import prompt_parser

    p, den, _ = _prepared(a1111, GuidanceSettings(pag_scale=3.0), batch_size=2, sampler="DDIM CFG++")
    # What A1111's ddim_cfgpp sets before its first call: w = 12.5 × 1/12.5 = 1 for our stack.
    den.cond_scale_miltiplier, den.need_last_noise_uncond = 1 / 12.5, True
    torch.manual_seed(8)
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 600.0)
    image_cond = torch.zeros(2, 5, 1, 1)
    model = a1111.shared.sd_model
    model.rows_seen.clear()
    with torch.no_grad():
        den(x, t, cond=p.c, uncond=p.uc, cond_scale=12.5, s_min_uncond=0.0, image_cond=image_cond)
        rows = list(model.rows_seen)
        _, c = prompt_parser.reconstruct_multicond_batch(p.c, 0)
        uc = prompt_parser.reconstruct_cond_batch(p.uc, 0)
        eps_c = den.inner_model(x, t, cond={"c_crossattn": [c], "c_concat": [image_cond]})
        eps_u = den.inner_model(x, t, cond={"c_crossattn": [uc], "c_concat": [image_cond]})
    # The sampler renoises with these rows: the uncond prediction, not a copy of the cond one.
    torch.testing.assert_close(den.last_noise_uncond, eps_u, atol=1e-4, rtol=1e-4)
    assert (eps_u - eps_c).abs().max() > 0.01
    assert rows == [6]  # c, u, c_pag for 2 images
    # A whole generation: every step keeps the uncond rows.
    model.rows_seen.clear()
    a1111.run([{"pag_scale": 3}], sampler_name="DDIM CFG++", cfg_scale=12.5, batch_size=1, steps=3)
    assert model.rows_seen == [3, 3]  # the stand-in's DDIM takes steps − 1 model calls


def test_host_ddim_cfgpp_refuses_dynamic_thresholding_with_one_line(a1111, capsys):
    _, plain = a1111.run([{}], sampler_name="DDIM CFG++", cfg_scale=7.0, batch_size=1, seed=3)
    capsys.readouterr()
    _, dyn = a1111.run([{"dynthres_enabled": True}], sampler_name="DDIM CFG++", cfg_scale=7.0, batch_size=1, seed=3)
    out = capsys.readouterr().out
    assert out.count("dynamic thresholding skipped") == 1 and "'DDIM CFG++ (lambda)'" in out
    # λ = 0.56 thresholded against mimic 7 would have amplified the guidance instead.
    torch.testing.assert_close(dyn.images, plain.images)


def _refiner_model():
    """SDXL refiner in the parts that matter here: a 2560-dim vector whose last 256 dims embed the
    aesthetic score, 6.0 for the prompt and 2.5 for the negative (both hosts' defaults)."""
    from tests.hosts.common.models import A1111Model

    class Refiner(A1111Model):
        def __init__(self):
            super().__init__("sdxl", adm_in_channels=2560)
            self.sd_model_hash = "standin-refiner"

        def get_learned_conditioning(self, texts):
            out = self.encoder(texts)
            score = 2.5 if getattr(texts, "is_negative_prompt", False) else 6.0
            out["vector"][:, -256:] = score / 10.0  # stands in for the Timestep(256) embedding
            return out

    return Refiner()


def test_untitled_zero_on_the_sdxl_refiner_keeps_the_uncond(a1111):
    from k_diffusion.external import CompVisDenoiser
    from modules import prompt_parser

    from lib_merge.webui.guidance import untitled_conds
    from tests.hosts.common.models import A1111Model

    def same(model):
        return untitled_conds.Untitled("zero", [1], 64, 64, 4, lambda: model).same_cond()

    a1111.shared.sd_model = model = _refiner_model()
    p, den, _ = _prepared(a1111, GuidanceSettings(untitled="zero"), batch_size=1)
    torch.manual_seed(9)
    x, sigma = torch.randn(1, 4, 4, 4) * 3.0, torch.full((1,), 3.0)
    image_cond = torch.zeros(1, 5, 1, 1)
    model.rows_seen.clear()
    with torch.no_grad():
        out = den(x, sigma, cond=p.c, uncond=p.uc, cond_scale=5.0, s_min_uncond=0.0, image_cond=image_cond)
        rows = list(model.rows_seen)
        cond, uncond = untitled_conds.compute_untitled_conds(model, "zero", p.seeds, width=p.width, height=p.height, steps=4)
        compvis = CompVisDenoiser(model)
        _, c = prompt_parser.reconstruct_multicond_batch(cond, 0)
        d_c = compvis(x, sigma, cond={**c, "c_concat": [image_cond]})
        d_u = compvis(x, sigma, cond={**prompt_parser.reconstruct_cond_batch(uncond, 0), "c_concat": [image_cond]})
    torch.testing.assert_close(out, d_u + 5.0 * (d_c - d_u), atol=5e-4, rtol=1e-3)
    assert (d_c - d_u).abs().max() > 0.01  # the aesthetic score alone makes c ≠ u
    assert rows == [2]
    assert same(A1111Model("sdxl")) and not same(_refiner_model())


def test_a_refiner_switch_mid_pass_decides_c_equiv_u_again(a1111):
    from lib_merge.webui.guidance import untitled_conds
    from lib_merge.webui.guidance.guided_pass import GuidedPass
    from tests.hosts.common.models import A1111Model

    class Denoiser:
        step, steps, total_steps = 0, 4, 4

    models = [A1111Model("sdxl")]
    untitled = untitled_conds.Untitled("zero", [1], 64, 64, 4, lambda: models[0])
    guided = GuidedPass(Denoiser(), GuidanceSettings(untitled="zero"), hires=False, untitled=untitled)
    roles = []

    def forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        roles.append(guided.current.plan.roles)

    for model in (models[0], _refiner_model()):  # the host reloads the refiner between two calls
        models[0] = model
        guided.forward(forward, torch.zeros(1, 4, 4, 4), torch.ones(1), None, None, 5.0, 0.0, None)
    assert roles == [("cond",), ("cond", "uncond")]
