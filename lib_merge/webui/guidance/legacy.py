"""Paste from the infotext keys of the extensions whose methods we replace: incantations (PAG,
SEG), sd-webui-freeu, sd-dynamic-thresholding, and reForge's built-in APG / guidance limiter and
MaHiRo scripts.

Their meanings differ from ours (incantations' SEG has no scale and a σ exponent, sd-webui-freeu's
window is half-open), so each parser maps the values into our settings fields, never "key present
⇒ on" alone. These formats belong to other projects, hence a module of their own; we only read
them (``infotext`` says why we never write them). ``paste`` calls a method's
parser only when none of our own keys for that method is present.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

from ...errors import BadParameterError
from ...guidance.settings import TO_THE_END
from .controls import CONTROL_BY_NAME
from .infotext import DEFAULT_SETTINGS, Warn, parse_bool, parse_field, parse_float

# A legacy parser's answer for keys that are present but cannot be read: leave the method alone.
UNREADABLE: Any = object()


def _legacy_pag(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """incantations' PAG keys (written only while PAG is active)."""
    keys = ("PAG Active", "PAG Scale", "PAG Start Step", "PAG End Step", "PAG SANF")
    if not any(k in params for k in keys):
        return None
    try:
        active = parse_bool(params["PAG Active"]) if "PAG Active" in params else True
        scale = parse_float(params["PAG Scale"]) if "PAG Scale" in params else CONTROL_BY_NAME["pag_scale"].default
        fields = {
            "pag_scale": scale if active else 0.0,
            "pag_sanf": parse_bool(params.get("PAG SANF", "False")),
            "pag_start": parse_float(params.get("PAG Start Step", "0")),
            "pag_end": parse_float(params.get("PAG End Step", str(TO_THE_END))),
        }
    except ValueError:
        warn("incantations PAG keys have an unreadable value; PAG left as it is")
        return UNREADABLE
    return fields


def _legacy_seg(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """incantations' SEG keys: ``SEG Blur Sigma`` is the exponent n of σ = 2ⁿ, n > 10.5 ⇒ ∞, n = 0 off.

    incantations' SEG has no scale: it blurs the queries of the *uncond* rows and runs plain CFG,
    D = D_ũ + w(D_c − D_ũ) = D_c + (w − 1)(D_c − D_ũ). With prompt ≡ negative (empty prompts on
    SD1.x, the untitled case) ũ is the blurred cond pass, so this is paper SEG with s = w − 1; we
    map it that way (exact there, an approximation with a real prompt). Without a ``CFG scale`` in
    the infotext the paper's default s = 3 is used.
    """
    keys = ("SEG Active", "SEG Blur Sigma", "SEG Start Step", "SEG End Step", "SEG Scale")
    if not any(k in params for k in keys):
        return None
    try:
        # incantations writes its SEG keys only while SEG is active (an infotext without
        # "SEG Active" but with the others comes from such a run), so their presence means on.
        active = parse_bool(params["SEG Active"]) if "SEG Active" in params else True
        threshold = parse_float(params.get("SEG Blur Threshold", "10.5"))
        n = parse_float(params.get("SEG Blur Sigma", "11"))
        if "SEG Scale" in params:  # an early incantations version had a real SEG scale
            scale = parse_float(params["SEG Scale"])
        elif "CFG scale" in params:
            scale = max(parse_float(params["CFG scale"]) - 1.0, 0.0)
            if scale == 0:
                warn("incantations SEG at CFG scale ≤ 1 had no effect (it acts through CFG); SEG left off")
        else:
            scale = 3.0
        fields = {
            "seg_scale": scale if (active and n > 0) else 0.0,
            "seg_sigma": math.inf if n > threshold else 2.0 ** n,
            "seg_start": parse_float(params.get("SEG Start Step", "0")),
            "seg_end": parse_float(params.get("SEG End Step", str(TO_THE_END))),
        }
    except ValueError:
        warn("incantations SEG keys have an unreadable value; SEG left as it is")
        return UNREADABLE
    return fields


_FREEU_STAGE_DEFAULTS = {
    "backbone_factor": 1.0, "skip_factor": 1.0, "backbone_offset": 0.0, "backbone_width": 0.5,
    "skip_cutoff": 0.0, "skip_high_end_factor": 1.0,
}


def _int_or_float(text: str):
    """sd-webui-freeu's own rule: an integer literal is a step, anything else a float."""
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _legacy_freeu(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """sd-webui-freeu's keys. It has no enable key: it writes them only while enabled and its own
    paste re-enables (``freeu_png_info_auto_enable``), so their presence means on."""
    keys = ("FreeU Stages", "FreeU Schedule", "FreeU Version")
    if not any(k in params for k in keys):
        return None
    fields: dict[str, Any] = {"freeu_enabled": True}
    try:
        stages = json.loads(params["FreeU Stages"]) if "FreeU Stages" in params else []
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise ValueError("FreeU Stages")
        full = [{**_FREEU_STAGE_DEFAULTS, **s} for s in stages] + [dict(_FREEU_STAGE_DEFAULTS)] * 2
        fields["freeu_b1"], fields["freeu_s1"] = float(full[0]["backbone_factor"]), float(full[0]["skip_factor"])
        fields["freeu_b2"], fields["freeu_s2"] = float(full[1]["backbone_factor"]), float(full[1]["skip_factor"])
        lost = [f"stage {i + 1} {k}" for i, s in enumerate(full[:2]) for k in
                ("backbone_offset", "backbone_width", "skip_cutoff", "skip_high_end_factor")
                if float(s[k]) != _FREEU_STAGE_DEFAULTS[k]]
        if len(stages) > 2 and any(float(stages[2].get(k, d)) != d for k, d in _FREEU_STAGE_DEFAULTS.items()):
            lost.append("stage 3 (320 channels)")
        if lost:
            warn(f"sd-webui-freeu options we do not have were ignored: {', '.join(lost)}")
        if "FreeU Version" in params:
            version = str(params["FreeU Version"]).strip().replace("Version ", "")
            fields["freeu_version"] = int(version)
        else:
            fields["freeu_version"] = 1  # sd-webui-freeu's State default
        if "FreeU Schedule" in params:
            start, stop, smooth, *_ = [s.strip() for s in str(params["FreeU Schedule"]).split(",")] + ["0", "1.0", "0"]
            start_v, stop_v = _int_or_float(start), _int_or_float(stop)
            fields["freeu_start"] = float(start_v)
            # sd-webui-freeu's window is start <= step < stop; ours is inclusive at both ends.
            fields["freeu_end"] = float(stop_v - 1) if isinstance(stop_v, int) else float(stop_v)
            if float(smooth) != 0:
                warn(f"sd-webui-freeu transition smoothness {smooth} is not supported; FreeU uses hard window edges")
    except (ValueError, TypeError, KeyError):
        warn("sd-webui-freeu keys have an unreadable value; FreeU left as it is")
        return UNREADABLE
    return fields


_DYNTHRES_LEGACY = {
    "Mimic scale": "dynthres_mimic_scale",
    "Threshold percentile": "dynthres_threshold_percentile",
    "Mimic mode": "dynthres_mimic_mode",
    "Mimic scale minimum": "dynthres_mimic_scale_min",
    "CFG mode": "dynthres_cfg_mode",
    "CFG scale minimum": "dynthres_cfg_scale_min",
    "Scheduler value": "dynthres_sched_val",
    "Separate Feature Channels": "dynthres_separate_feature_channels",
    "Scaling Startpoint": "dynthres_scaling_startpoint",
    "Variability Measure": "dynthres_variability_measure",
    "Interpolate Phi": "dynthres_interpolate_phi",
}


# A1111 1.10's samplers flagged "second_order", for a paste outside a host or of a sampler the
# host lacks.
_SECOND_ORDER = frozenset({"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"})


def _second_order(name: Optional[str]) -> bool:
    if not name:
        return False
    try:
        from modules import sd_samplers
    except ImportError:
        return name in _SECOND_ORDER
    config = sd_samplers.find_sampler_config(name)
    if config is None:
        return name in _SECOND_ORDER
    return bool(getattr(config, "options", {}).get("second_order", False))


def _legacy_dynthres(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """sd-dynamic-thresholding's keys; "Dynamic thresholding enabled" is always written with them."""
    if "Dynamic thresholding enabled" not in params:
        return None
    try:
        fields: dict[str, Any] = {"dynthres_enabled": parse_bool(params["Dynamic thresholding enabled"])}
        for key, name in _DYNTHRES_LEGACY.items():
            fields[name] = parse_field(name, params[key]) if key in params else getattr(DEFAULT_SETTINGS, name)
    except (ValueError, BadParameterError):
        warn("sd-dynamic-thresholding keys have an unreadable value; dynamic thresholding left as it is")
        return UNREADABLE
    scheduled = [f"{label} {fields[name]}" for label, name in (("mimic", "dynthres_mimic_mode"), ("CFG", "dynthres_cfg_mode"))
                 if fields[name] != "Constant"]
    sampler = params.get("Sampler")
    if fields["dynthres_enabled"] and scheduled and _second_order(sampler):
        # His schedule position counts model calls (two per step here); ours counts sampler steps.
        warn(f"sd-dynamic-thresholding schedule ({', '.join(scheduled)}) on the second-order sampler {sampler}: "
             "it advanced once per model call, we advance once per sampler step, so the scheduled scales "
             "differ from the original run's")
    return fields


def _legacy_reforge_apg(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """reForge's "APG's now your CFG" keys (``apgisyourcfg_*``, written only while enabled).

    Its guidance is the paper form D_c + (w − 1)·g' (our ``paper``), η weighting the parallel part
    as ours; its projection is on x − D_c instead of D_c and its momentum fades with the
    timestep ("adaptive momentum"), which we do not have: pasted as constant momentum, said once.
    """
    keys = ("apgisyourcfg_enabled", "apgisyourcfg_momentum", "apgisyourcfg_norm_thr", "apgisyourcfg_eta")
    if not any(k in params for k in keys):
        return None
    try:
        fields = {
            "apg_enabled": parse_bool(params.get("apgisyourcfg_enabled", "True")),
            "apg_momentum": parse_float(params.get("apgisyourcfg_momentum", "0.5")),
            "apg_norm_threshold": parse_float(params.get("apgisyourcfg_norm_thr", "15")),
            "apg_eta": parse_float(params.get("apgisyourcfg_eta", "1")),
            "apg_form": "paper",
        }
        adaptive = parse_float(params.get("apgisyourcfg_adaptive_momentum", "0"))
    except ValueError:
        warn("reForge APG keys have an unreadable value; APG left as it is")
        return UNREADABLE
    if fields["apg_enabled"] and adaptive != 0 and fields["apg_momentum"] != 0:
        warn(f"reForge APG adaptive momentum {adaptive:g} is not supported: momentum {fields['apg_momentum']:g} "
             "is constant here, and reForge projects on x − D_c, so the image will differ")
    return fields


def _legacy_reforge_limiter(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """reForge's guidance limiter (in its APG script): guidance for σ in (end, start], as ours;
    a bound of −1 is open."""
    keys = ("guidance_limiter_enabled", "guidance_sigma_start", "guidance_sigma_end")
    if not any(k in params for k in keys):
        return None
    try:
        high = parse_float(params.get("guidance_sigma_start", "5.42"))
        low = parse_float(params.get("guidance_sigma_end", "0.28"))
        fields = {
            "cfg_interval": parse_bool(params.get("guidance_limiter_enabled", "True")),
            "cfg_interval_high": math.inf if high < 0 else high,
            "cfg_interval_low": 0.0 if low < 0 else low,
        }
    except ValueError:
        warn("reForge guidance limiter keys have an unreadable value; CFG interval left as it is")
        return UNREADABLE
    return fields


def _legacy_reforge_mahiro(params: Mapping[str, str], warn: Warn) -> Optional[dict[str, Any]]:
    """reForge's MaHiRo key ``mahiro_cfg_enabled`` (its only setting)."""
    if "mahiro_cfg_enabled" not in params:
        return None
    try:
        return {"mahiro_enabled": parse_bool(params["mahiro_cfg_enabled"])}
    except ValueError:
        warn("reForge mahiro_cfg_enabled has an unreadable value; MaHiRo left as it is")
        return UNREADABLE


LEGACY_PARSERS = {
    "pag": _legacy_pag, "seg": _legacy_seg, "freeu": _legacy_freeu, "dynthres": _legacy_dynthres,
    "apg": _legacy_reforge_apg, "cfg_interval": _legacy_reforge_limiter, "mahiro": _legacy_reforge_mahiro,
}
