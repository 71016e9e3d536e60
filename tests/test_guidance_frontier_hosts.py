"""The frontier methods (APG, CFG-Zero*, TCFG, MaHiRo, Skimmed CFG, FDG, NAG, CFG interval) end to
end on the stand-in hosts (tests/hosts): each changes the image against the same seed without it,
writes its infotext, and the proof of effect names a method whose hook was disconnected."""
from __future__ import annotations

import pytest
import torch

from tests import hosts as host

# One request per method, with settings that must act on the tiny U-Net (CFG 7, 3 steps).
METHODS = {
    "APG": {"apg_enabled": True, "apg_eta": 0.0, "apg_momentum": -0.5},
    "CFG-Zero*": {"cfgzero_enabled": True, "cfgzero_zero_init_steps": 1},
    "TCFG": {"tcfg_enabled": True},
    "MaHiRo": {"mahiro_enabled": True},
    "Skimmed CFG": {"skimmed_enabled": True, "skimmed_scale": 2.0},
    "FDG": {"fdg_enabled": True, "fdg_high_scale": 12.0},
    "NAG": {"nag_scale": 4.0, "nag_alpha": 1.0},
    "CFG interval": {"cfg_interval": True, "cfg_interval_low": 0.0, "cfg_interval_high": 5.0},
}
KEYS = {"APG": "UG APG", "CFG-Zero*": "UG CFG-Zero", "TCFG": "UG TCFG", "MaHiRo": "UG MaHiRo",
        "Skimmed CFG": "UG Skimmed CFG", "FDG": "UG FDG", "NAG": "UG NAG scale", "CFG interval": "UG CFG interval"}


def _generations(name: str, **size):
    """Inside ``installed(name)``: run(args, **p) → one txt2img with the script's args."""
    from modules import processing

    runner, _, _ = host.guidance_runner(name)

    def run(args, **kwargs):
        params = {"prompt": "a cat", "negative_prompt": "ugly, blurry", "steps": 3, "cfg_scale": 7.0, "seed": 5,
                  "batch_size": 2, **size, **kwargs}
        p = processing.StableDiffusionProcessingTxt2Img(**params)
        p.scripts, p.script_args = runner, tuple(args)
        return processing.process_images(p)

    return run


@pytest.fixture
def a1111():
    with host.installed("a1111", fake_gradio=True):
        yield _generations("a1111", width=32, height=32)


def _image(res) -> torch.Tensor:
    images = res.images
    return torch.stack(list(images)) if isinstance(images, (list, tuple)) else images


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_changes_the_image_and_writes_its_infotext(a1111, method, capsys):
    base = _image(a1111([{}]))
    res = a1111([METHODS[method]])
    out = capsys.readouterr().out
    change = float((_image(res) - base).abs().max())
    assert change > 1e-4, f"{method}: max |Δimage| = {change}"
    assert f"{KEYS[method]}:" in res.infotexts[0]
    assert "Guidance check" not in res.infotexts[0] and "had no effect" not in out, out
    # The console summary names the method (the real A1111 printed "pass nothing" for these).
    summary = [l for l in out.splitlines() if l.startswith("[Untitled Guidance] pass ")]
    assert summary and f"pass {method}" in summary[-1], summary
    # The same request again gives the same image (no state left over from the last generation).
    assert torch.equal(_image(a1111([METHODS[method]])), _image(res))


def test_nag_with_untitled_reads_the_real_negative_prompt(a1111):
    # Untitled makes the uncond equal the cond; NAG must still steer away from the negative prompt.
    args = {"untitled": "empty", "nag_scale": 4.0, "nag_alpha": 1.0}
    first = _image(a1111([args], cfg_scale=1.0, negative_prompt="ugly"))
    second = _image(a1111([args], cfg_scale=1.0, negative_prompt="a dog in the snow"))
    plain = _image(a1111([{"untitled": "empty"}], cfg_scale=1.0, negative_prompt="ugly"))
    assert float((first - second).abs().max()) > 1e-4
    assert float((first - plain).abs().max()) > 1e-4


def test_a_disconnected_nag_hook_is_named_once_in_console_and_infotext(a1111, capsys, monkeypatch):
    from lib_merge.guidance import hooks

    # The host replaced the layers: our hooks are installed on nothing.
    monkeypatch.setattr(hooks, "find_attention_layers", lambda *a, **k: [])
    res = a1111([{"nag_scale": 4.0}])
    lines = [l for l in capsys.readouterr().out.splitlines() if "Guidance check" in l]
    assert len(lines) == 1 and "NAG had no effect" in lines[0] and "not reached" in lines[0], lines
    assert "Guidance check: NAG had no effect" in res.infotexts[0]


@pytest.mark.parametrize("args, method", [
    ({"apg_enabled": True}, "APG"),  # at CFG 1 every combiner returns D_c
    ({"nag_scale": 1.0, "nag_enabled": True}, "NAG"),  # φ = 1 is the identity
])
def test_a_method_without_effect_says_so(a1111, args, method, capsys):
    res = a1111([args], cfg_scale=1.0 if method == "APG" else 7.0)
    out = capsys.readouterr().out
    assert f"Guidance check: {method} had no effect" in res.infotexts[0]
    assert sum("Guidance check" in l for l in out.splitlines()) == 1


def test_two_combiners_fail_the_generation_with_one_message(a1111, capsys):
    from lib_merge.errors import BadParameterError

    with pytest.raises(BadParameterError, match="APG and MaHiRo each replace the CFG combine"):
        a1111([{"apg_enabled": True, "mahiro_enabled": True}])
    assert "APG and MaHiRo" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- Forge

@pytest.fixture
def forge():
    with host.installed("forge", fake_gradio=True):
        yield _generations("forge")


@pytest.mark.parametrize("method", list(METHODS))
def test_forge_each_method_changes_the_image_and_writes_its_infotext(forge, method, capsys):
    base = _image(forge([{}]))
    res = forge([METHODS[method]])
    out = capsys.readouterr().out
    change = float((_image(res) - base).abs().max())
    assert change > 1e-4, f"{method}: max |Δimage| = {change}"
    assert f"{KEYS[method]}:" in res.infotexts[0]
    assert "Guidance check" not in res.infotexts[0] and "had no effect" not in out, out
    summary = [l for l in out.splitlines() if l.startswith("[Untitled Guidance] pass ")]
    assert summary and f"pass {method}" in summary[-1], summary


def test_forge_nag_at_cfg_1_with_untitled_skips_the_uncond_and_still_acts(forge, capsys):
    args = {"untitled": "empty", "nag_scale": 4.0, "nag_alpha": 1.0}
    first = _image(forge([args], cfg_scale=1.0, negative_prompt="ugly"))
    second = _image(forge([args], cfg_scale=1.0, negative_prompt="a dog in the snow"))
    assert float((first - second).abs().max()) > 1e-4
    assert "1.0 rows per image per call" in capsys.readouterr().out


def test_forge_disconnected_nag_hook_is_named(forge, capsys, monkeypatch):
    from lib_merge.guidance import hooks

    monkeypatch.setattr(hooks, "find_attention_layers", lambda *a, **k: [])
    res = forge([{"nag_scale": 4.0}])
    lines = [l for l in capsys.readouterr().out.splitlines() if "Guidance check" in l]
    assert len(lines) == 1 and "NAG had no effect" in lines[0] and "not reached" in lines[0], lines
    assert "Guidance check: NAG had no effect" in res.infotexts[0]
