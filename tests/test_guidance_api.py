"""API requests with bad Untitled Guidance args, on both stand-in hosts: the request fails right
after the scripts' ``process`` hook, before the prompts are encoded or the model is called, with
one console line and no traceback (the stand-in middleware prints one for any exception but
fastapi's HTTPException, as both hosts' does)."""
from __future__ import annotations

import pytest

from lib_merge.webui.guidance import controls as guidance_controls
from tests import hosts as host


def _setup(name):
    from modules import shared

    runner, _, _ = host.guidance_runner(name)
    return shared.sd_model, runner


def _model_calls(model) -> int:
    return len(model.kmodel.calls) if hasattr(model, "kmodel") else model.apply_calls


@pytest.mark.parametrize("name", ["a1111", "forge"])
@pytest.mark.parametrize("args, named", [
    ([{"pag_scal": 3}], "pag_scal"),
    ([{"seg_scale": 2, "seg_sigma": -1}], "seg_sigma"),
    ([{"pag_scale": 3}, {"seg_scale": 2}], "one dict"),
    # Two combiners: one message naming both, never one of them dropped silently.
    ([{"apg_enabled": True, "tcfg_enabled": True}], "APG and TCFG each replace the CFG combine"),
    ([{"nag_scale": 3, "nag_tau": 0.5}], "nag_tau"),
])
def test_bad_args_fail_before_sampling_with_one_line(name, args, named, capsys):
    with host.installed(name, fake_gradio=True):
        from modules.api import api

        model, runner = _setup(name)
        defaults = [c.default for c in guidance_controls.CONTROLS]
        req = {"prompt": "a cat", "steps": 2, "alwayson_scripts": {"untitled guidance": {"args": args}}}
        status, body = api.text2imgapi(req, runner, defaults)
        out = capsys.readouterr()
        assert status == 500 and body["error"] == "BadParameterError"
        assert named in body["errors"] and "\n" not in body["errors"]
        assert _model_calls(model) == 0 and model.encoder.calls == 0  # no prompt encoded, no U-Net call
        log = (out.out + out.err).strip().splitlines()
        assert len(log) == 1 and log[0].startswith("[Untitled Guidance] ") and named in log[0]

        # The next, valid request on the same runner is unaffected.
        req["alwayson_scripts"]["untitled guidance"]["args"] = [{"pag_scale": 2}]
        status, body = api.text2imgapi(req, runner, defaults)
        assert status == 200 and "UG PAG scale: 2.0" in body["info"][0] and _model_calls(model) > 0
