"""Untitled Guidance controls, infotext write -> paste, legacy keys, API args and X/Y/Z axes (no host)."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import types

import pytest

from lib_merge.errors import BadParameterError
from lib_merge.guidance.settings import GuidanceSettings
from lib_merge.webui.guidance import args as guidance_args, controls as guidance_controls, infotext as guidance_infotext, paste as guidance_paste, ui as guidance_ui, xyz as xyz_guidance
from tests.hosts.a1111.modules import infotext_utils as itu  # pure: json and re only

SEED_INFOTEXT = "SEG Blur Sigma: 11, SEG Start Step: 0, SEG End Step: 2048, PAG Active: True, PAG SANF: True, PAG Scale: 1"

EVERYTHING_ON = GuidanceSettings(
    untitled="gibberish", cfgpp=0.55, cfgpp_hires=False,
    pag_scale=4.5, pag_sanf=True, pag_start=2.0, pag_end=0.75, pag_layers="OUT00-OUT02, M00", pag_hires=False,
    seg_scale=2.5, seg_sigma=6.5, seg_start=0.1, seg_end=17.0, seg_layers="IN07,IN08", seg_hires=False,
    freeu_enabled=True, freeu_version=1, freeu_b1=1.1, freeu_b2=1.25, freeu_s1=0.6, freeu_s2=0.4,
    freeu_start=1.0 / 3.0, freeu_end=12.0, freeu_hires=False,
    rescale_phi=0.7, rescale_hires=False,
    dynthres_enabled=True, dynthres_mimic_scale=4.0, dynthres_threshold_percentile=99.5, dynthres_mimic_mode="Power Up",
    dynthres_mimic_scale_min=1.5, dynthres_cfg_mode="Cosine Down", dynthres_cfg_scale_min=2.0, dynthres_sched_val=2.5,
    dynthres_separate_feature_channels=False, dynthres_scaling_startpoint="ZERO", dynthres_variability_measure="STD",
    dynthres_interpolate_phi=0.3, dynthres_hires=False,
)


def infotext_line(extra: dict) -> str:
    """create_infotext's join, with A1111's quoting, after a few fixed keys."""
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x512", **extra}
    text = ", ".join(k if k == v else f"{k}: {itu.quote(v)}" for k, v in params.items() if v is not None)
    return f"a prompt\nNegative prompt: ugly\n{text}"


def paste(text: str, warn=None) -> dict:
    params = itu.parse_generation_parameters(text)
    return guidance_paste.parse_infotext_params(params, warn=warn or (lambda m: None))


def settings_after_paste(text: str, start=None) -> GuidanceSettings:
    controls = dict(start or guidance_controls.CONTROL_DEFAULTS)
    controls.update({k: v for k, v in paste(text).items() if v is not None})
    return guidance_controls.settings_from_controls(controls)


# ------------------------------------------------------------------------------ infotext keys

def test_every_key_is_accepted_by_a1111s_infotext_regex():
    key_re = re.compile(r"\w[\w \-/]+")
    for key in guidance_infotext.ALL_OUR_KEYS:
        assert key_re.fullmatch(key), key
    assert len(set(guidance_infotext.INFOTEXT_KEYS.values())) == len(guidance_infotext.INFOTEXT_KEYS)


@pytest.mark.parametrize("settings", [
    EVERYTHING_ON,
    EVERYTHING_ON.replace(seg_sigma=math.inf, untitled="zero", pag_layers="all", freeu_version=2),
    GuidanceSettings(untitled="empty", pag_scale=3.0),
])
def test_write_then_paste_restores_every_key(settings):
    extra = {}
    guidance_infotext.write_infotext(extra, settings)
    text = infotext_line(extra)
    params = itu.parse_generation_parameters(text)
    for key in extra:
        assert key in params, key  # each key survives A1111's parser, quoted values included
    assert settings_after_paste(text) == settings


def test_only_active_methods_are_written_and_stale_keys_are_replaced():
    extra = {"Other": 1}
    guidance_infotext.write_infotext(extra, EVERYTHING_ON)
    guidance_infotext.write_infotext(extra, GuidanceSettings(pag_scale=2.0))
    ours = {k for k in extra if k in guidance_infotext.ALL_OUR_KEYS}
    assert ours == {guidance_infotext.INFOTEXT_KEYS[f] for f in guidance_infotext.METHOD_FIELDS["pag"]}
    assert extra["Other"] == 1 and extra["UG PAG scale"] == 2.0
    guidance_infotext.write_infotext(extra, GuidanceSettings())
    assert not ({k for k in extra} & guidance_infotext.ALL_OUR_KEYS)
    extra = {}
    guidance_infotext.write_infotext(extra, GuidanceSettings(rescale_phi=0.5))
    assert extra[guidance_infotext.RESCALE_SPACE_KEY] == "v"


def test_missing_keys_switch_methods_off_and_keep_sliders():
    values = paste(infotext_line({}))
    assert values["untitled"] == "off"
    for switch in ("cfgpp_enabled", "pag_enabled", "seg_enabled", "freeu_enabled", "rescale_enabled", "dynthres_enabled"):
        assert values[switch] is False
    assert "pag_scale" not in values and "freeu_b1" not in values  # left as the user had them


# --------------------------------------------------------------------------------- legacy keys

def test_seed_infotext_pastes_into_working_settings():
    warnings = []
    values = paste(SEED_INFOTEXT, warn=warnings.append)
    assert values["pag_enabled"] is True and values["pag_scale"] == 1.0 and values["pag_sanf"] is True
    assert values["pag_start"] == 0.0 and values["pag_end"] == 2048.0
    # No "SEG Active" key, but incantations writes SEG keys only while SEG is on.
    assert values["seg_enabled"] is True and values["seg_sigma_inf"] is True
    # incantations' SEG acts through CFG: s = w − 1; without a CFG key the paper's default 3.
    assert values["seg_scale"] == 3.0
    s = settings_after_paste(SEED_INFOTEXT)
    assert s.pag_on and s.seg_on and math.isinf(s.seg_sigma) and s.pag_sanf
    # Inside a full infotext the CFG scale (7) gives s = 6.
    seed_keys = {k: v for k, v in itu.parse_generation_parameters(SEED_INFOTEXT).items() if k not in ("Prompt", "Negative prompt")}
    assert settings_after_paste(infotext_line(seed_keys)).seg_scale == 6.0
    assert not warnings


def test_incantations_values_are_parsed_not_presence():
    # incantations' own paste turns SANF on whenever the key exists; "PAG SANF: False" is always written.
    s = settings_after_paste(infotext_line({"PAG Active": True, "PAG SANF": False, "PAG Scale": 4, "PAG Start Step": 3, "PAG End Step": 15}))
    assert s.pag_scale == 4.0 and s.pag_sanf is False and (s.pag_start, s.pag_end) == (3.0, 15.0)
    assert not settings_after_paste(infotext_line({"PAG Active": False, "PAG Scale": 4})).pag_on
    seg = settings_after_paste(infotext_line({"SEG Active": True, "SEG Blur Sigma": 3, "SEG Start Step": 1, "SEG End Step": 9}))
    assert seg.seg_sigma == 8.0 and seg.seg_scale == 6.0 and (seg.seg_start, seg.seg_end) == (1.0, 9.0)
    assert math.isinf(settings_after_paste(infotext_line({"SEG Active": True, "SEG Blur Sigma": 10.6})).seg_sigma)
    assert not settings_after_paste(infotext_line({"SEG Active": True, "SEG Blur Sigma": 0})).seg_on
    assert not settings_after_paste(infotext_line({"SEG Active": False, "SEG Blur Sigma": 11})).seg_on


def test_our_keys_win_over_legacy_keys():
    extra = {"PAG Active": True, "PAG Scale": 9}
    guidance_infotext.write_infotext(extra, GuidanceSettings(pag_scale=2.0))
    assert settings_after_paste(infotext_line(extra)).pag_scale == 2.0


def test_sd_webui_freeu_keys():
    stages = '[{"backbone_factor": 1.2, "skip_factor": 0.9}, {"backbone_factor": 1.4, "skip_factor": 0.2}]'
    extra = {"FreeU Stages": stages, "FreeU Schedule": "0.0, 1.0, 0.0", "FreeU Version": "2"}
    text = infotext_line(extra)
    assert '"FreeU Stages": ' not in text and 'FreeU Stages: "[{' in text  # A1111 quotes it
    s = settings_after_paste(text)
    assert s.freeu_enabled and (s.freeu_b1, s.freeu_s1, s.freeu_b2, s.freeu_s2) == (1.2, 0.9, 1.4, 0.2)
    assert s.freeu_version == 2 and (s.freeu_start, s.freeu_end) == (0.0, 1.0)
    warnings = []
    values = paste(infotext_line({"FreeU Stages": '[{"backbone_factor": 1.1, "backbone_width": 0.75}]',
                                  "FreeU Schedule": "2, 15, 0.5", "FreeU Version": "1"}), warn=warnings.append)
    # Integer schedule = steps, stop exclusive there and inclusive here; defaults for a missing stage.
    assert (values["freeu_start"], values["freeu_end"]) == (2.0, 14.0)
    assert (values["freeu_b1"], values["freeu_b2"], values["freeu_s2"], values["freeu_version"]) == (1.1, 1.0, 1.0, "1")
    assert any("backbone_width" in w for w in warnings) and any("smoothness" in w for w in warnings)


def test_dynamic_thresholding_keys():
    extra = {"Dynamic thresholding enabled": True, "Mimic scale": 1, "Separate Feature Channels": False,
             "Scaling Startpoint": "MEAN", "Variability Measure": "AD", "Interpolate Phi": 0.3,
             "Threshold percentile": 100, "Mimic mode": "Linear Down", "Mimic scale minimum": 0.5,
             "CFG mode": "Power Up", "CFG scale minimum": 1.5, "Scheduler value": 2}
    s = settings_after_paste(infotext_line(extra))
    assert s.dynthres_enabled and s.dynthres_mimic_scale == 1.0 and s.dynthres_separate_feature_channels is False
    assert (s.dynthres_interpolate_phi, s.dynthres_threshold_percentile) == (0.3, 100.0)
    assert (s.dynthres_mimic_mode, s.dynthres_mimic_scale_min, s.dynthres_cfg_mode) == ("Linear Down", 0.5, "Power Up")
    assert (s.dynthres_cfg_scale_min, s.dynthres_sched_val) == (1.5, 2.0)
    assert not settings_after_paste(infotext_line({**extra, "Dynamic thresholding enabled": False})).dynthres_enabled


_MCMONKEY_SCHEDULED = {"Dynamic thresholding enabled": True, "Mimic scale": 7, "Mimic mode": "Linear Down",
                       "Mimic scale minimum": 1, "CFG mode": "Constant", "Threshold percentile": 100}


def _schedule_notes(extra: dict) -> list:
    warnings: list = []
    paste(infotext_line(extra), warn=warnings.append)
    return [w for w in warnings if "sd-dynamic-thresholding schedule" in w]


def test_dynthres_schedule_on_a_second_order_sampler_is_named_on_paste():
    notes = _schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "Heun"})
    assert len(notes) == 1 and "mimic Linear Down" in notes[0] and "Heun" in notes[0]
    assert "once per model call" in notes[0] and "once per sampler step" in notes[0]
    # First-order sampler, constant schedules or dynthres off: both schedules agree, nothing to say.
    assert _schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "Euler a"}) == []
    assert _schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "DPM2 a", "Mimic mode": "Constant"}) == []
    assert _schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "Heun", "Dynamic thresholding enabled": False}) == []
    assert len(_schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "DPM++ 2S a", "Mimic mode": "Constant",
                                "CFG mode": "Cosine Up"})) == 1


def test_dynthres_schedule_note_reads_the_hosts_sampler_flags(monkeypatch):
    from tests import hosts as host

    with host.installed("a1111", fake_gradio=True):
        from modules import sd_samplers, sd_samplers_common

        custom = sd_samplers_common.SamplerData("Custom 2nd", None, [], {"second_order": True})
        monkeypatch.setitem(sd_samplers.all_samplers_map, "Custom 2nd", custom)
        assert len(_schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "Custom 2nd"})) == 1
        assert _schedule_notes({**_MCMONKEY_SCHEDULED, "Sampler": "Euler"}) == []


def test_unreadable_values_leave_the_method_alone():
    warnings = []
    values = paste(infotext_line({"UG PAG scale": "lots", "FreeU Stages": "[not json"}), warn=warnings.append)
    assert values["pag_enabled"] is True and values["pag_scale"] == 3.0  # unreadable -> default, PAG kept on
    assert "freeu_enabled" not in values and "freeu_b1" not in values
    assert len(warnings) == 2
    values = paste(infotext_line({"UG PAG scale": 500}), warn=warnings.append)
    assert "pag_enabled" not in values and "out of" not in warnings[-1] and "PAG" in warnings[-1].upper()


def test_paste_cache_parses_once_per_infotext():
    calls = []
    cache = guidance_paste.PasteCache(warn=calls.append)
    params = itu.parse_generation_parameters(SEED_INFOTEXT)
    getters = [cache.getter(c.name) for c in guidance_controls.CONTROLS]
    values = [g(params) for g in getters]
    assert values[guidance_controls.CONTROL_NAMES.index("pag_scale")] == 1.0
    assert cache.values(params) is cache.values(dict(params))


def test_infotext_fields_are_callable_names_for_send_to():
    comps = [types.SimpleNamespace(value=c.default) for c in guidance_controls.CONTROLS]
    fields = guidance_ui.infotext_fields(comps, guidance_paste.PasteCache(warn=lambda m: None))
    names = guidance_ui.send_to_names()
    for (_, key), name in zip(fields, names):
        assert callable(key) and key == name and key in names  # "Send to" matches by name, paste calls it
    pasted = itu.paste_values(fields, itu.parse_generation_parameters(SEED_INFOTEXT))
    by_name = {c.name: v for c, v in zip(guidance_controls.CONTROLS, pasted)}
    assert by_name["pag_scale"] == {"value": 1.0} and by_name["pag_sanf"] == {"value": True}
    assert by_name["freeu_enabled"] == {"value": False} and by_name["freeu_b1"] == {}


# ------------------------------------------------------------------------------------- API args

def test_api_dict_and_positional_agree():
    by_name = guidance_args.settings_from_args([{"untitled": "empty", "pag_scale": 3, "seg_scale": 2, "seg_sigma": "inf",
                                      "freeu_enabled": True, "rescale_phi": 0.7, "dynthres_enabled": True,
                                      "dynthres_mimic_scale": 5, "cfgpp": 0.5}])
    positional = [guidance_controls.controls_from_settings(by_name)[c.name] for c in guidance_controls.CONTROLS]
    assert guidance_args.settings_from_args(positional) == by_name
    assert by_name.untitled == "empty" and by_name.pag_scale == 3 and math.isinf(by_name.seg_sigma)
    assert by_name.cfgpp == 0.5 and by_name.rescale_phi == 0.7 and by_name.dynthres_mimic_scale == 5
    # A switch alone uses the UI's default scale; a switch off wins over a scale.
    assert guidance_args.settings_from_args([{"pag_enabled": True}]).pag_scale == 3.0
    assert not guidance_args.settings_from_args([{"pag_enabled": False, "pag_scale": 4}]).pag_on
    # A short positional list leaves the rest at their defaults, as A1111 does.
    assert guidance_args.settings_from_args(["zero"]) == GuidanceSettings(untitled="zero")


def test_api_errors_name_the_problem():
    with pytest.raises(BadParameterError, match="pag_scal"):
        guidance_args.settings_from_args([{"pag_scal": 3}])
    with pytest.raises(BadParameterError, match="untitled"):
        guidance_args.settings_from_args([{"untitled": "nothing"}])
    with pytest.raises(BadParameterError, match="positional"):
        guidance_args.settings_from_args([None] * (len(guidance_controls.CONTROLS) + 1))
    with pytest.raises(BadParameterError, match="pag_scale"):
        guidance_args.settings_from_args([{"pag_scale": "a lot"}])


# ---------------------------------------------------------------------------------------- X/Y/Z

def test_axes_cover_every_parameter_and_set_p_attributes():
    labels = [a.label for a in xyz_guidance.AXES]
    # One per control except seg_sigma_inf, plus the combiner axis.
    assert len(labels) == len(set(labels)) == len(guidance_controls.CONTROLS) - 1 + 1
    for name in ("pag_scale", "seg_sigma", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "rescale_phi",
                 "dynthres_mimic_scale", "untitled", "pag_start", "seg_end", "freeu_end"):
        assert xyz_guidance.axis_label(name) in labels
    axis = next(a for a in xyz_guidance.AXES if a.label == xyz_guidance.axis_label("pag_scale"))
    p = types.SimpleNamespace()
    axis.apply(p, 2.5)
    assert p.untitled_guidance_pag_scale == 2.5
    axis.confirm([0.0, 2.5])
    with pytest.raises(BadParameterError):
        axis.confirm([250.0])
    mode = next(a for a in xyz_guidance.AXES if a.label == xyz_guidance.axis_label("untitled"))
    assert mode.choices() == ["off", "empty", "zero", "gibberish"]


def test_p_overrides_switch_their_method_on():
    p = types.SimpleNamespace(untitled_guidance_pag_scale=2.0, untitled_guidance_freeu_b1=1.5, untitled_guidance_seg_sigma=float("inf"))
    values = xyz_guidance.apply_p_overrides(guidance_controls.CONTROL_DEFAULTS, p)
    s = guidance_controls.settings_from_controls(values)
    assert s.pag_scale == 2.0 and s.freeu_enabled and s.freeu_b1 == 1.5
    assert s.seg_on and s.seg_scale == 3.0 and math.isinf(s.seg_sigma)  # a σ axis plots SEG at the UI's scale
    p = types.SimpleNamespace(untitled_guidance_freeu_b1=1.5, untitled_guidance_freeu_enabled=False)
    controls = xyz_guidance.apply_p_overrides(guidance_controls.CONTROL_DEFAULTS, p)
    assert not guidance_controls.settings_from_controls(controls).freeu_enabled


# ---------------------------------------------------------------------------------------- UI

def _fake_gradio():
    path = os.path.join(os.path.dirname(__file__), "hosts", "gradio_fake", "gradio", "__init__.py")
    spec = importlib.util.spec_from_file_location("fake_gradio_for_ui_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_ui_makes_every_control_in_order():
    gr = _fake_gradio()
    comps = guidance_ui.build_ui(gr, lambda item: f"ug_{item}")
    assert [c.elem_id for c in comps] == [f"ug_{c.name}" for c in guidance_controls.CONTROLS]
    assert [c.value for c in comps] == [c.default for c in guidance_controls.CONTROLS]
    assert all(c.label for c in comps)  # the API's script info needs a label per control
    assert any(isinstance(c, gr.Markdown) and "CFG scale 1" in c.value for c in gr.created)
    slider = comps[guidance_controls.CONTROL_NAMES.index("pag_scale")]
    assert (slider.minimum, slider.maximum) == (0.0, 20.0)



# ----------------------------------------------------------------- the guidance frontier methods

FRONTIER = GuidanceSettings(
    nag_scale=4.0, nag_tau=3.0, nag_alpha=0.5, nag_layers="IN07,M00", nag_start=1.0, nag_end=0.8, nag_hires=False,
    cfg_interval=True, cfg_interval_low=0.5, cfg_interval_high=math.inf, cfg_interval_hires=False,
)
ONE_COMBINER_EACH = [
    FRONTIER.replace(apg_enabled=True, apg_eta=0.3, apg_norm_threshold=12.5, apg_momentum=-0.75, apg_form="comfyui",
                     apg_hires=False),
    FRONTIER.replace(cfgzero_enabled=True, cfgzero_optimized_scale=False, cfgzero_zero_init_steps=2,
                     cfgzero_form="comfyui", cfgzero_hires=False),
    FRONTIER.replace(tcfg_enabled=True, tcfg_hires=False),
    FRONTIER.replace(mahiro_enabled=True, mahiro_hires=False),
    FRONTIER.replace(skimmed_enabled=True, skimmed_scale=5.5, skimmed_mode="linear", skimmed_full_negative=True,
                     skimmed_flipping_filter=False, skimmed_hires=False),
    FRONTIER.replace(fdg_enabled=True, fdg_high_scale=10.5, fdg_hires=False),
]


@pytest.mark.parametrize("settings", ONE_COMBINER_EACH, ids=lambda s: s.combiner)
def test_frontier_write_then_paste_restores_every_key(settings):
    extra = {}
    guidance_infotext.write_infotext(extra, settings)
    combiner = settings.combiner
    assert {k for k in extra if k in guidance_infotext.ALL_OUR_KEYS} == {
        guidance_infotext.INFOTEXT_KEYS[f]
        for m in (combiner, "nag", "cfg_interval") for f in guidance_infotext.METHOD_FIELDS[m]}
    assert extra["UG CFG interval high"] == "inf" and extra["UG NAG scale"] == 4.0
    text = infotext_line(extra)
    params = itu.parse_generation_parameters(text)
    for key in extra:
        assert key in params, key
    assert settings_after_paste(text) == settings
    # The σ field shows an open bound as a finite σ above any schedule's (gradio sends inf as null).
    assert paste(text)["cfg_interval_high"] == guidance_controls.OPEN_SIGMA
    # Paste of an infotext without the frontier keys switches them all off.
    values = paste(infotext_line({}))
    for switch in ("apg_enabled", "cfgzero_enabled", "tcfg_enabled", "mahiro_enabled", "skimmed_enabled",
                   "fdg_enabled", "nag_enabled", "cfg_interval"):
        assert values[switch] is False, switch


def test_frontier_keys_are_written_only_when_active():
    extra = {}
    # Parameters moved away from their defaults but every method off: no key.
    guidance_infotext.write_infotext(extra, GuidanceSettings(apg_eta=0.7, nag_tau=4.0, fdg_high_scale=3.0,
                                                             cfg_interval_low=1.0, skimmed_scale=2.0))
    assert not (set(extra) & guidance_infotext.ALL_OUR_KEYS)
    guidance_infotext.write_infotext(extra, GuidanceSettings(nag_scale=2.0))
    assert set(extra) == {guidance_infotext.INFOTEXT_KEYS[f] for f in guidance_infotext.METHOD_FIELDS["nag"]}


def test_reforge_keys_paste_as_apg_cfg_interval_and_mahiro():
    warnings = []
    text = infotext_line({
        "apgisyourcfg_enabled": True, "apgisyourcfg_momentum": 0.5, "apgisyourcfg_adaptive_momentum": 0.18,
        "apgisyourcfg_norm_thr": 15.0, "apgisyourcfg_eta": 1.0,
        "guidance_limiter_enabled": True, "guidance_sigma_start": 5.42, "guidance_sigma_end": -1.0,
    })
    values = paste(text, warn=warnings.append)
    s = settings_after_paste(text)
    assert s.apg_enabled and (s.apg_momentum, s.apg_norm_threshold, s.apg_eta, s.apg_form) == (0.5, 15.0, 1.0, "paper")
    assert s.cfg_interval and (s.cfg_interval_low, s.cfg_interval_high) == (0.0, 5.42)
    assert values["mahiro_enabled"] is False
    assert len(warnings) == 1 and "adaptive momentum 0.18" in warnings[0]
    s = settings_after_paste(infotext_line({"mahiro_cfg_enabled": True}))
    assert s.mahiro_enabled and not s.apg_enabled and not s.cfg_interval
    # Our keys win over reForge's for the same method.
    extra = {}
    guidance_infotext.write_infotext(extra, GuidanceSettings(apg_enabled=True, apg_eta=0.25))
    s = settings_after_paste(infotext_line({**extra, "apgisyourcfg_enabled": True, "apgisyourcfg_eta": 1.0}))
    assert s.apg_eta == 0.25


def test_frontier_api_names_switches_and_conflict():
    s = guidance_args.settings_from_args([{"nag_scale": 3, "apg_enabled": True, "apg_eta": 0.5, "cfg_interval": "true",
                                           "cfg_interval_high": "inf"}])
    assert s.nag_on and s.nag_scale == 3 and s.apg_enabled and s.apg_eta == 0.5 and s.cfg_interval
    assert math.isinf(s.cfg_interval_high)
    assert guidance_args.settings_from_args([{"nag_enabled": True}]).nag_scale == 3.0  # the UI's default φ
    assert not guidance_args.settings_from_args([{"nag_enabled": False, "nag_scale": 4}]).nag_on
    assert guidance_args.settings_from_args([{"cfgzero_enabled": True, "cfgzero_zero_init_steps": 2}]).cfgzero_zero_init_steps == 2
    with pytest.raises(BadParameterError, match="APG and FDG each replace the CFG combine") as err:
        guidance_args.settings_from_args([{"apg_enabled": True, "fdg_enabled": True}])
    assert "\n" not in str(err.value)
    positional = [guidance_controls.controls_from_settings(s)[c.name] for c in guidance_controls.CONTROLS]
    assert guidance_args.settings_from_args(positional).replace(cfg_interval_high=math.inf) == s


def test_frontier_axes_for_every_numeric_parameter_and_the_combiner():
    labels = {a.label: a for a in xyz_guidance.AXES}
    numeric = [c.name for c in guidance_controls.CONTROLS
               if c.kind in ("slider", "number") and c.method in guidance_controls.METHOD_SWITCH
               and c.method not in ("untitled", "cfgpp", "pag", "seg", "freeu", "rescale", "dynthres")]
    assert set(numeric) >= {"apg_eta", "apg_norm_threshold", "apg_momentum", "cfgzero_zero_init_steps", "skimmed_scale",
                            "fdg_high_scale", "nag_scale", "nag_tau", "nag_alpha", "nag_start", "nag_end",
                            "cfg_interval_low", "cfg_interval_high"}
    for name in numeric:
        assert labels[xyz_guidance.axis_label(name)].type is float, name
    combiner = labels["[Untitled Guidance] combiner"]
    assert combiner.choices() == ["CFG", "APG", "CFG-Zero*", "TCFG", "MaHiRo", "Skimmed CFG", "FDG"]
    combiner.confirm(combiner.choices())
    with pytest.raises(BadParameterError, match="choose one of CFG, APG"):
        combiner.confirm(["APG", "PAG"])

    start = {**guidance_controls.CONTROL_DEFAULTS, "apg_enabled": True}  # the UI had APG on
    for choice, expected in (("TCFG", "tcfg"), ("CFG", "cfg"), ("fdg", "fdg"), ("CFG-Zero*", "cfgzero")):
        p = types.SimpleNamespace()
        combiner.apply(p, choice)
        # A combiner parameter axis in the same cell does not switch its combiner back on.
        labels[xyz_guidance.axis_label("apg_eta")].apply(p, 0.5)
        s = guidance_controls.settings_from_controls(xyz_guidance.apply_p_overrides(start, p))
        assert s.combiner == expected and s.apg_eta == 0.5
    # Without the combiner axis, a parameter axis switches its method on; a second combiner is refused.
    p = types.SimpleNamespace()
    labels[xyz_guidance.axis_label("nag_tau")].apply(p, 3.5)
    s = guidance_controls.settings_from_controls(xyz_guidance.apply_p_overrides(guidance_controls.CONTROL_DEFAULTS, p))
    assert s.nag_on and s.nag_scale == 3.0 and s.nag_tau == 3.5
    labels[xyz_guidance.axis_label("fdg_high_scale")].apply(p, 8.0)
    with pytest.raises(BadParameterError, match="APG and FDG"):
        guidance_controls.settings_from_controls(xyz_guidance.apply_p_overrides(start, p))


def test_frontier_ui_sections_collapsed_with_tooltips_and_the_conflict_line():
    gr = _fake_gradio()
    extras = {}
    comps = guidance_ui.build_ui(gr, lambda item: f"ug_{item}", extras)
    by_name = dict(zip(guidance_controls.CONTROL_NAMES, comps))
    for name in ("apg_enabled", "apg_eta", "cfgzero_zero_init_steps", "skimmed_scale", "fdg_high_scale", "nag_scale",
                 "cfg_interval"):
        assert by_name[name].kwargs.get("info"), name  # a tooltip with the recommended values
    assert "3" in by_name["nag_scale"].kwargs["info"] and "0.28, 5.42" in by_name["cfg_interval"].kwargs["info"]
    assert isinstance(extras["conflict"], gr.Markdown) and extras["conflict"].value == ""

    names = guidance_ui.CONFLICT_INPUTS
    def line(**on):
        return guidance_ui.conflict_message(*(on.get(n, False) for n in names))
    assert line() == "" and line(apg_enabled=True, nag_enabled=True) == "" and line(fdg_enabled=True) == ""
    message = line(mahiro_enabled=True, skimmed_enabled=True)
    assert "MaHiRo and Skimmed CFG each replace the CFG combine" in message
    assert "CFG++ and TCFG" in line(cfgpp_enabled=True, tcfg_enabled=True)
    assert "CFG interval" in line(cfgpp_enabled=True, cfg_interval=True)
