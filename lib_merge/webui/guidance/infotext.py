"""Our infotext keys: writing them into ``p.extra_generation_params`` and reading their values back.

We write only our own ``UG …`` keys, never the legacy ones: incantations, sd-webui-freeu or
sd-dynamic-thresholding, when installed, would enable themselves on paste and double-apply, and
their meanings differ from ours. The value readers (``parse_*``) sit next to the writer whose
format they invert; paste (``paste``) and the legacy mappings (``legacy``) use
them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, MutableMapping

from ...guidance.settings import GuidanceSettings, coerce

# Our infotext keys, one per settings field (plus the rescale space, which is not a setting).
# Only word characters, spaces, '-' and '/': A1111's ``re_param_code`` accepts nothing else.
INFOTEXT_KEYS: dict[str, str] = {
    "untitled": "UG untitled",
    "cfgpp": "UG CFGpp lambda",
    "cfgpp_hires": "UG CFGpp hires",
    "pag_scale": "UG PAG scale",
    "pag_sanf": "UG PAG SANF",
    "pag_start": "UG PAG start",
    "pag_end": "UG PAG end",
    "pag_layers": "UG PAG layers",
    "pag_hires": "UG PAG hires",
    "seg_scale": "UG SEG scale",
    "seg_sigma": "UG SEG sigma",
    "seg_start": "UG SEG start",
    "seg_end": "UG SEG end",
    "seg_layers": "UG SEG layers",
    "seg_hires": "UG SEG hires",
    "freeu_enabled": "UG FreeU",
    "freeu_version": "UG FreeU version",
    "freeu_b1": "UG FreeU b1",
    "freeu_b2": "UG FreeU b2",
    "freeu_s1": "UG FreeU s1",
    "freeu_s2": "UG FreeU s2",
    "freeu_start": "UG FreeU start",
    "freeu_end": "UG FreeU end",
    "freeu_hires": "UG FreeU hires",
    "rescale_phi": "UG rescale phi",
    "rescale_hires": "UG rescale hires",
    "dynthres_enabled": "UG DynThres",
    "dynthres_mimic_scale": "UG DynThres mimic scale",
    "dynthres_threshold_percentile": "UG DynThres percentile",
    "dynthres_mimic_mode": "UG DynThres mimic mode",
    "dynthres_mimic_scale_min": "UG DynThres mimic min",
    "dynthres_cfg_mode": "UG DynThres CFG mode",
    "dynthres_cfg_scale_min": "UG DynThres CFG min",
    "dynthres_sched_val": "UG DynThres scheduler value",
    "dynthres_separate_feature_channels": "UG DynThres separate channels",
    "dynthres_scaling_startpoint": "UG DynThres startpoint",
    "dynthres_variability_measure": "UG DynThres measure",
    "dynthres_interpolate_phi": "UG DynThres phi",
    "dynthres_hires": "UG DynThres hires",
    "apg_enabled": "UG APG",
    "apg_eta": "UG APG eta",
    "apg_norm_threshold": "UG APG norm threshold",
    "apg_momentum": "UG APG momentum",
    "apg_form": "UG APG form",
    "apg_hires": "UG APG hires",
    "cfgzero_enabled": "UG CFG-Zero",
    "cfgzero_optimized_scale": "UG CFG-Zero optimized scale",
    "cfgzero_zero_init_steps": "UG CFG-Zero zero-init steps",
    "cfgzero_form": "UG CFG-Zero form",
    "cfgzero_hires": "UG CFG-Zero hires",
    "tcfg_enabled": "UG TCFG",
    "tcfg_hires": "UG TCFG hires",
    "mahiro_enabled": "UG MaHiRo",
    "mahiro_hires": "UG MaHiRo hires",
    "skimmed_enabled": "UG Skimmed CFG",
    "skimmed_scale": "UG Skimmed scale",
    "skimmed_mode": "UG Skimmed mode",
    "skimmed_full_negative": "UG Skimmed full negative",
    "skimmed_flipping_filter": "UG Skimmed flipping filter",
    "skimmed_hires": "UG Skimmed hires",
    "fdg_enabled": "UG FDG",
    "fdg_high_scale": "UG FDG high scale",
    "fdg_hires": "UG FDG hires",
    "nag_scale": "UG NAG scale",
    "nag_tau": "UG NAG tau",
    "nag_alpha": "UG NAG alpha",
    "nag_layers": "UG NAG layers",
    "nag_start": "UG NAG start",
    "nag_end": "UG NAG end",
    "nag_hires": "UG NAG hires",
    "cfg_interval": "UG CFG interval",
    "cfg_interval_low": "UG CFG interval low",
    "cfg_interval_high": "UG CFG interval high",
    "cfg_interval_hires": "UG CFG interval hires",
}
RESCALE_SPACE_KEY = "UG rescale space"
assert set(INFOTEXT_KEYS) == set(GuidanceSettings.field_names()), "every settings field needs an infotext key"
# The proof-of-effect line ("Guidance check: NAG had no effect"), written after sampling; removed
# with our other keys so an X/Y/Z cell never inherits another cell's verdict.
EFFECT_KEY = "Guidance check"
ALL_OUR_KEYS = frozenset(INFOTEXT_KEYS.values()) | {RESCALE_SPACE_KEY, EFFECT_KEY}

# Which settings fields belong to which method (the first one is what turns it on).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "untitled": ("untitled",),
    "cfgpp": ("cfgpp", "cfgpp_hires"),
    "pag": ("pag_scale", "pag_sanf", "pag_start", "pag_end", "pag_layers", "pag_hires"),
    "seg": ("seg_scale", "seg_sigma", "seg_start", "seg_end", "seg_layers", "seg_hires"),
    "freeu": ("freeu_enabled", "freeu_version", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2",
              "freeu_start", "freeu_end", "freeu_hires"),
    "rescale": ("rescale_phi", "rescale_hires"),
    "dynthres": tuple(f for f in GuidanceSettings.field_names() if f.startswith("dynthres_")),
    **{m: tuple(f for f in GuidanceSettings.field_names() if f.startswith(m + "_"))
       for m in ("apg", "cfgzero", "tcfg", "mahiro", "skimmed", "fdg", "nag")},
    "cfg_interval": ("cfg_interval", "cfg_interval_low", "cfg_interval_high", "cfg_interval_hires"),
}
assert sorted(f for names in METHOD_FIELDS.values() for f in names) == sorted(GuidanceSettings.field_names())

# A field's default gives the type its infotext text is parsed as, and the value a missing key falls back to.
DEFAULT_SETTINGS = GuidanceSettings()


def _method_on(settings: GuidanceSettings, method: str) -> bool:
    s = settings
    return {
        "untitled": s.untitled != "off",
        "cfgpp": s.cfgpp_on,
        "pag": s.pag_on,
        "seg": s.seg_on,
        "freeu": s.freeu_enabled,
        "rescale": s.rescale_on,
        "dynthres": s.dynthres_enabled,
        "apg": s.apg_enabled,
        "cfgzero": s.cfgzero_enabled,
        "tcfg": s.tcfg_enabled,
        "mahiro": s.mahiro_enabled,
        "skimmed": s.skimmed_enabled,
        "fdg": s.fdg_enabled,
        "nag": s.nag_on,
        "cfg_interval": s.cfg_interval,
    }[method]


def _fmt(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        # Floats stay floats, unrounded: str() of a float round-trips exactly, and "1.0" (a
        # fraction of the run) must not turn into "1" on the way.
        return value
    return value


def infotext_items(settings: GuidanceSettings) -> dict[str, Any]:
    """Our infotext keys for the methods that are on; every parameter of an active method."""
    items: dict[str, Any] = {}
    for method, names in METHOD_FIELDS.items():
        if not _method_on(settings, method):
            continue
        for name in names:
            items[INFOTEXT_KEYS[name]] = _fmt(getattr(settings, name))
        if method == "rescale":
            from ...guidance.rescale import RESCALE_SPACE

            items[RESCALE_SPACE_KEY] = RESCALE_SPACE
    return items


def write_infotext(extra_generation_params: MutableMapping[str, Any], settings: GuidanceSettings) -> None:
    """Replace our keys in ``p.extra_generation_params`` (X/Y/Z cells share that dict)."""
    for key in ALL_OUR_KEYS:
        extra_generation_params.pop(key, None)
    extra_generation_params.update(infotext_items(settings))


# How paste reports a value it cannot use: one line per problem (the console, unless a caller passes its own).
Warn = Callable[[str], None]


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(text)


def parse_float(text: str) -> float:
    return float(str(text).strip())


def parse_field(name: str, text: str) -> Any:
    default = getattr(DEFAULT_SETTINGS, name)
    if isinstance(default, bool):
        return parse_bool(text)
    if isinstance(default, float):
        return parse_float(text)
    return coerce(name, default, str(text).strip())
