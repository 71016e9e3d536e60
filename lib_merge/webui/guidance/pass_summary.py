"""The console summary of what guidance ran in a batch, and how many model rows it cost.

Both hosts record each guided pass of the batch on the processing object and print one line at
``postprocess_batch``.
"""
from __future__ import annotations

import math
from typing import Optional

from ...guidance.settings import GuidanceSettings
from ...guidance.effect import INFOTEXT_KEY as EFFECT_KEY
from .console import TITLE, line_once
from .guided_pass import GuidedPass

_PASSES_ATTR = "_untitled_guidance_passes"


def record_pass(p, guided: Optional[GuidedPass]) -> Optional[GuidedPass]:
    """Remember the passes of this batch for the summary line."""
    if guided is not None:
        passes = p.__dict__.setdefault(_PASSES_ATTR, [])
        if guided not in passes:
            passes.append(guided)
    return guided


def describe(settings: GuidanceSettings) -> str:
    s, parts = settings, []
    if s.untitled != "off":
        parts.append(f"untitled {s.untitled}")
    if s.cfgpp_on:
        parts.append(f"CFG++ λ {s.cfgpp:g}")
    if s.pag_on:
        parts.append(f"PAG {s.pag_scale:g} ({s.pag_layers}{', SANF' if s.pag_sanf else ''})")
    if s.seg_on:
        parts.append(f"SEG {s.seg_scale:g} (σ {'∞' if math.isinf(s.seg_sigma) else f'{s.seg_sigma:g}'}, {s.seg_layers})")
    if s.freeu_enabled:
        parts.append(f"FreeU v{s.freeu_version}")
    if s.rescale_on:
        parts.append(f"rescale φ {s.rescale_phi:g}")
    if s.dynthres_enabled:
        parts.append(f"dynamic thresholding (mimic {s.dynthres_mimic_scale:g})")
    # The frontier methods too: without them the real hosts printed "pass nothing" for an APG run.
    parts.extend(s.combiners_on)
    if s.nag_on:
        parts.append(f"NAG φ {s.nag_scale:g} ({s.nag_layers})")
    if s.cfg_interval:
        high = "∞" if math.isinf(s.cfg_interval_high) else f"{s.cfg_interval_high:g}"
        parts.append(f"CFG interval ({s.cfg_interval_low:g}, {high}]")
    return ", ".join(parts)


def summary_line(passes: list, n_images: int) -> Optional[str]:
    """What was applied, and how many model rows each step cost: "enabled but no effect" is the most
    common complaint about guidance extensions, so say what ran."""
    runs = []
    for guided in passes:
        if not guided.steps_seen:
            continue
        what = describe(guided.stack.settings if guided.stack is not None else guided.settings) or "nothing"
        text = f"{'hires' if guided.hires else 'pass'} {what}: {guided.steps_seen} model calls"
        rows = sum(guided.rows_per_step)
        if rows:
            text += (f", {rows / guided.steps_seen / max(n_images, 1):.1f} rows per image per call"
                     f" in {sum(guided.forwards_per_step) / guided.steps_seen:.1f} forward(s)")
        runs.append(text)
    return f"[{TITLE}] " + "; ".join(runs) if runs else None


def report_effects(p, passes: list) -> Optional[str]:
    """Proof of effect at the end of the batch's passes: each method that changed nothing gets one
    console line saying why, and the infotext ``Guidance check: <method> had no effect; …``."""
    texts: list[str] = []
    for guided in passes:
        stack = guided.stack
        if stack is None or not guided.steps_seen:
            continue
        stack.finish()
        for check in stack.effects.new_failures():
            line_once(check.console_line)
        for check in stack.effects.failures():
            if check.text not in texts:
                texts.append(check.text)
    value = "; ".join(texts) if texts else None
    params = getattr(p, "extra_generation_params", None)
    if value is not None and isinstance(params, dict):
        params[EFFECT_KEY] = value
    return value


def print_summary(p) -> None:
    """Print the line of the batch's passes and forget them (``postprocess_batch``)."""
    passes = p.__dict__.pop(_PASSES_ATTR, [])
    report_effects(p, passes)
    line = summary_line(passes, len(getattr(p, "seeds", None) or [0]))
    if line:
        print(line, flush=True)
