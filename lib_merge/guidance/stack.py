"""The guidance stack: which U-Net passes a step needs, and how their predictions combine.

Per step, ``plan(step)`` names the passes (roles) out of ``("cond", "uncond", "pag", "seg")`` and
gives explicit row ranges of one batched forward: cond rows first (one per ``AND`` sub-prompt),
then the uncond rows, then a copy of the cond rows for each perturbed pass. Roles are never
inferred from "halves" of a batch. ``combine(...)`` then computes, in D (x0) space::

    Δ     = Σ_k α_k (D_c,k − D_u)                       per image, α_k the AND weights
    D     = D_u + w·Δ + s_pag·Σ_k α_k (D_c,k − D_pag,k) + s_seg·Σ_k α_k (D_c,k − D_seg,k)
    D     ← dynamic_threshold(D, mimic target D_u + m·Δ)        if enabled
    D     ← cfg_rescale(D, D̄_c = D_u + Δ, φ, space "v")         if enabled

With SANF the CFG term and the PAG term are fused per element instead of added (SEG stays
additive). Under CFG++, w is λ and ``cfgpp_state`` receives D_u for the sampler's renoise step;
dynamic thresholding, whose mimic scale lives on the CFG-scale axis, then acts on the step's
CFG-equivalent prediction (see ``_threshold_cfgpp``).

The uncond pass is decided here and nowhere else (``plan``): it runs when anything reads D_u —
the CFG term (w ≠ 1), CFG++'s renoise step, dynamic thresholding's mimic target, SANF inside the
PAG window, ``AND`` weights that do not sum to 1 (``force_uncond``), or the host's own sampler
(``host_reads_uncond``: A1111's and Forge's *DDIM CFG++* read ``last_noise_uncond``). With
c ≡ u (untitled) it is skipped, because D_u = D_c exactly; a host reader still gets the real pass
unless the adapter hands it the cond rows in place of the skipped ones
(``cond_stands_in_for_uncond``). When skipped, each image's D_u is the weight-normalised mean of
its sub-prompt predictions (with one sub-prompt: D_u = D_c, so the CFG term vanishes).

The alternative combiners (APG, CFG-Zero*, TCFG, MaHiRo, Skimmed CFG, FDG; ``combiners``) replace
``D_u + w·Δ``; the PAG/SEG terms, dynamic thresholding and rescale then act on their result as on
plain CFG (SANF fuses the combiner's term ``D_cfg − D_u``). A CFG-Zero* zero-init step returns x
and runs only the cond rows. NAG acts inside the U-Net on the cond rows and their perturbed
copies (``StepPlan.nag_rows``) and reads no D_u. The CFG interval sets w = 1 at a σ outside it,
where the CFG-axis methods (combiner, dynamic thresholding) have nothing to do and the uncond is
skipped unless something else reads it. ``effects`` is the proof-of-effect report (``effect``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import BadParameterError
from .cfg import CondRows, CondsList
from .apg import ApgMomentum
from .cfgpp import CfgppState
from .combiners import LABELS, combine_predictions, reads_uncond
from .dynthres import DynThresholdConfig, dynamic_threshold
from .effect import EffectReport
from .interval import SigmaInterval
from .rescale import RESCALE_SPACE, cfg_rescale
from .sanf import sanf_fuse
from .settings import GuidanceSettings
from .window import StepWindow

ROLES = ("cond", "uncond", "pag", "seg")


@dataclass(frozen=True)
class StepPlan:
    """What one sampler step runs and with which scales (all already scheduled for this step)."""

    step: int
    roles: tuple[str, ...]
    # w of the CFG term, after the dynthres CFG schedule; under CFG++ it is λ, and with dynthres
    # also on, the schedule is applied in combine on the CFG-equivalent scale (it needs σ_next).
    cfg_scale: float
    host_cfg_scale: float
    pag_scale: float = 0.0
    seg_scale: float = 0.0
    sanf: bool = False
    rescale_phi: float = 0.0
    dynthres: DynThresholdConfig | None = None
    mimic_scale: float = 0.0
    cfgpp: bool = False
    freeu: bool = False
    combiner: str = "cfg"
    zero_init: bool = False  # a CFG-Zero* zero-init step: D = x
    nag: bool = False
    interval_off: bool = False  # σ outside the CFG interval: w forced to 1

    def nag_rows(self, n_cond: int, n_uncond: int) -> list[slice]:
        """Rows NAG acts on: the cond rows and their perturbed copies (never the uncond rows)."""
        return [r for role, r in self.rows(n_cond, n_uncond).items() if role != "uncond"] if self.nag else []

    def rows(self, n_cond: int, n_uncond: int) -> dict[str, slice]:
        """Row range of each role in the batched forward: cond, uncond, then one cond copy per perturbed pass."""
        sizes = {"cond": n_cond, "uncond": n_uncond, "pag": n_cond, "seg": n_cond}
        out, start = {}, 0
        for role in self.roles:
            out[role] = slice(start, start + sizes[role])
            start += sizes[role]
        return out

    def batch_size(self, n_cond: int, n_uncond: int) -> int:
        """Rows of the batched forward."""
        return sum(r.stop - r.start for r in self.rows(n_cond, n_uncond).values())

    @property
    def is_trivial(self) -> bool:
        """Only plain CFG at the host's scale: the host's own CFG gives the same D (roles may lack the uncond)."""
        return (
            set(self.roles) <= {"cond", "uncond"}
            and self.rescale_phi == 0
            and self.dynthres is None
            and not self.cfgpp
            and self.combiner == "cfg"
            and not self.zero_init
            and self.cfg_scale == self.host_cfg_scale
        )


class GuidanceStack:
    """Composes CFG or one alternative combiner, CFG++, PAG, SEG, SANF, NAG, the CFG interval,
    rescale and dynamic thresholding for one sampling pass (a new pass needs a new stack: it
    holds the pass's state, APG's momentum and the proof-of-effect report)."""

    def __init__(
        self,
        settings: GuidanceSettings,
        total_steps: int,
        *,
        hires: bool = False,
        cfg_scale: float,
        untitled_same_cond: bool = False,
        cond_stands_in_for_uncond: bool = True,
    ):
        if int(total_steps) < 1:
            raise BadParameterError(f"total_steps={total_steps!r}: a sampling pass has at least one step")
        self.settings = settings
        self.total_steps = int(total_steps)
        self.hires = hires
        self.cfg_scale = float(cfg_scale)
        self.same_cond = untitled_same_cond
        # Whether the host, when we skip its uncond rows, receives the cond rows in their place
        # (A1111 adapter) rather than nothing (Forge: zeros).
        self.cond_stands_in_for_uncond = cond_stands_in_for_uncond

        def live(on: bool, in_hires: bool) -> bool:
            return on and (in_hires or not hires)

        s = settings
        self.pag_on = live(s.pag_on, s.pag_hires)
        self.seg_on = live(s.seg_on, s.seg_hires)
        self.cfgpp_on = live(s.cfgpp_on, s.cfgpp_hires)
        self.freeu_on = live(s.freeu_enabled, s.freeu_hires)
        self.rescale_phi = s.rescale_phi if live(s.rescale_on, s.rescale_hires) else 0.0
        self.dynthres = DynThresholdConfig.from_settings(s) if live(s.dynthres_enabled, s.dynthres_hires) else None
        self.pag_window = StepWindow(s.pag_start, s.pag_end)
        self.seg_window = StepWindow(s.seg_start, s.seg_end)
        self.freeu_window = StepWindow(s.freeu_start, s.freeu_end)
        self.rescale_space = RESCALE_SPACE
        self.cfgpp_state = CfgppState()
        combiner = s.combiner
        self.combiner = combiner if combiner != "cfg" and live(True, getattr(s, f"{combiner}_hires")) else "cfg"
        self.nag_on = live(s.nag_on, s.nag_hires)
        self.nag_window = StepWindow(s.nag_start, s.nag_end)
        self.interval = (SigmaInterval(s.cfg_interval_low, s.cfg_interval_high)
                         if live(s.cfg_interval, s.cfg_interval_hires) else None)
        self.apg_momentum = ApgMomentum()
        self.effects = EffectReport(self.active_methods())

    def active_methods(self) -> list[str]:
        """Names of the methods this pass runs, as the proof-of-effect report names them."""
        on = [
            (LABELS[self.combiner], self.combiner != "cfg"),
            ("PAG", self.pag_on),
            ("SEG", self.seg_on),
            ("NAG", self.nag_on),
            ("FreeU", self.freeu_on),
            ("CFG interval", self.interval is not None),
            ("dynamic thresholding", self.dynthres is not None),
            ("CFG rescale", self.rescale_phi > 0),
        ]
        return [name for name, active in on if active]

    def finish(self) -> None:
        """End of the pass: methods never checked are reported as never active."""
        if self.effects.pending("CFG interval"):
            self.effects.resolve("CFG interval", False, 0.0, "the σ of every step lay inside the interval")
        self.effects.finish()

    def note_hook(self, method: str, **seen) -> None:
        """What a U-Net hook of ``method`` saw this step (see ``EffectReport.note_hook``)."""
        self.effects.note_hook(method, **seen)

    def note_hooks(self, plan: StepPlan, seen: Mapping[str, Any]) -> None:
        """What the U-Net hooks counted in a step's forwards, for the proof of effect: ``seen`` holds
        ``PAG``/``SEG`` → perturbed forwards, ``NAG`` → (guided rows, max change, reference),
        ``FreeU`` → (forwards, patched stages). A NAG step with no count means its hook was never
        reached; the hosts' adapters and the test runner report through here alike."""
        for method, on in (("PAG", plan.pag_scale), ("SEG", plan.seg_scale)):
            if on and method in seen:
                self.note_hook(method, reached=seen[method] > 0)
        if plan.nag:
            applied, change, reference = seen.get("NAG", (0, 0.0, 0.0))
            self.note_hook("NAG", reached=applied > 0, max_change=change, reference=reference,
                           reason="its guided attention equals the cond's (φ = 1, α = 0, or a negative equal to the prompt)")
        if plan.freeu and "FreeU" in seen:
            forwards, patched = seen["FreeU"]
            if forwards and not patched:
                self.note_hook("FreeU", reached=True, max_change=0.0, reference=1.0,
                               reason="every stage factor is 1, or no decoder stage has the 4×/2× model-channel width")
            else:
                self.note_hook("FreeU", reached=forwards > 0)

    def freeu_active(self, step: int) -> bool:
        """Whether FreeU patches the decoder at ``step``."""
        return self.freeu_on and self.freeu_window.contains(step, self.total_steps)

    def plan(self, step: int, *, sigma=None, force_uncond: bool = False, host_reads_uncond: bool = False) -> StepPlan:
        """Passes and scales of 0-based sampler ``step`` (not the model call: both calls of a
        second-order step share it, which is what APG's momentum and CFG-Zero*'s zero-init count).

        ``sigma`` (a number or the per-image tensor) is the call's noise level; the CFG interval
        needs it. ``force_uncond`` keeps the uncond pass even where it could be skipped (``AND``
        weights that do not sum to 1); ``host_reads_uncond`` says the host's sampler reads the
        uncond rows itself.
        """
        lam_axis = self.cfgpp_on and self.dynthres is not None
        w = self.settings.cfgpp if self.cfgpp_on else self.cfg_scale
        mimic = 0.0
        if self.dynthres is not None:
            scheduled, mimic = self.dynthres.scales(w, step, self.total_steps)
            if not lam_axis:
                w = scheduled
        dynthres = self.dynthres
        interval_off = False
        if self.interval is not None:
            if sigma is None:
                raise BadParameterError("the CFG interval needs the σ of the model call: plan(step, sigma=...)")
            if not self.interval.contains(sigma):
                w, dynthres, interval_off = 1.0, None, True
        zero_init = self.combiner == "cfgzero" and step < self.settings.cfgzero_zero_init_steps
        active = not zero_init
        pag = active and self.pag_on and self.pag_window.contains(step, self.total_steps)
        seg = active and self.seg_on and self.seg_window.contains(step, self.total_steps)
        nag = active and self.nag_on and self.nag_window.contains(step, self.total_steps)
        sanf = self.settings.pag_sanf and pag
        if self.same_cond:
            # D_u would repeat D_c bit for bit, so our combine substitutes it exactly; a host
            # sampler reading the rows needs the real pass only if it would not get the cond rows.
            uncond = host_reads_uncond and not self.cond_stands_in_for_uncond
        else:
            stack_reads = force_uncond or (active and (
                self.cfgpp_on or dynthres is not None or reads_uncond(self.combiner, w, self.settings) or sanf))
            uncond = stack_reads or host_reads_uncond
        roles = ("cond",) + (("uncond",) if uncond else ()) + (("pag",) if pag else ()) + (("seg",) if seg else ())
        return StepPlan(
            step=step,
            roles=roles,
            cfg_scale=w,
            host_cfg_scale=self.cfg_scale,
            pag_scale=self.settings.pag_scale if pag else 0.0,
            seg_scale=self.settings.seg_scale if seg else 0.0,
            sanf=sanf,
            rescale_phi=self.rescale_phi,
            dynthres=dynthres,
            mimic_scale=mimic,
            cfgpp=self.cfgpp_on,
            freeu=self.freeu_active(step),
            combiner=self.combiner,
            zero_init=zero_init,
            nag=nag,
            interval_off=interval_off,
        )

    def combine(
        self,
        plan: StepPlan,
        step: int,
        *,
        x: torch.Tensor,
        sigma: torch.Tensor,
        d_cond: torch.Tensor,
        d_uncond: torch.Tensor | None,
        d_pag: torch.Tensor | None = None,
        d_seg: torch.Tensor | None = None,
        conds_list: CondsList | None = None,
    ) -> torch.Tensor:
        """The guided x0 prediction D for the image batch of ``x`` (see the module docstring for the formula)."""
        if step != plan.step:
            raise BadParameterError(f"combine(step={step}) got the plan of step {plan.step}")
        n_images = x.shape[0]
        rows = CondRows(conds_list, d_cond.shape[0], n_images)
        out_dtype = d_cond.dtype
        work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        d_cond = d_cond.to(work)
        has_uncond = d_uncond is not None
        if has_uncond:
            if d_uncond.shape[0] != n_images:
                raise BadParameterError(f"d_uncond has {d_uncond.shape[0]} rows for {n_images} images")
            d_u = d_uncond.to(work)
        else:
            d_u = rows.weighted_mean(d_cond)

        delta = rows.weighted_sum(d_cond - rows.per_row(d_u))
        checking = self.effects.any_pending
        if checking:
            self._check_hooks(plan)
        keep = None
        w = plan.cfg_scale
        if plan.zero_init:
            # CFG-Zero*'s zero-init: no move at all this step (D = x), whatever else is on.
            guided = x.to(work)
            if checking:
                self.effects.measure("CFG-Zero*", d_u + w * delta, guided, "x equals the cond prediction")
            self.cfgpp_state.record(d_u.to(out_dtype))
            return guided.to(out_dtype)
        if plan.cfgpp and plan.dynthres is not None:
            keep = self._cfgpp_keep()
            w = keep * plan.dynthres.scales(w / keep, step, self.total_steps)[0]
        if plan.combiner == "cfg":
            terms = [w * delta]
        else:
            combined = combine_predictions(plan.combiner, self.settings, x=x.to(work), d_cond=d_u + delta,
                                           d_uncond=d_u, scale=w, step=step, momentum=self.apg_momentum)
            if checking:
                self.effects.measure(LABELS[plan.combiner], d_u + w * delta, combined,
                                     self._why_no_cfg_effect(has_uncond, plan, w))
            terms = [combined - d_u]
        if checking and plan.interval_off:
            self._check_interval(has_uncond)
        if plan.pag_scale:
            if d_pag is None:
                raise BadParameterError("plan includes the 'pag' pass but combine() got no d_pag")
            terms.append(plan.pag_scale * rows.weighted_sum(d_cond - d_pag.to(work)))
            if checking:
                self._check_term("PAG", terms[-1], d_u + delta)
        # SANF picks between the CFG and PAG terms. A D_u the plan skipped equals D_c (c ≡ u), so
        # the fusion stays exact; one the host skipped (NGMS, skip early CFG) means no CFG term.
        if plan.sanf and plan.pag_scale and (has_uncond or "uncond" not in plan.roles):
            terms = [sanf_fuse(terms[:2])] + terms[2:]
        if plan.seg_scale:
            if d_seg is None:
                raise BadParameterError("plan includes the 'seg' pass but combine() got no d_seg")
            terms.append(plan.seg_scale * rows.weighted_sum(d_cond - d_seg.to(work)))
            if checking:
                self._check_term("SEG", terms[-1], d_u + delta)
        guided = d_u + sum(terms[1:], terms[0])

        if plan.dynthres is not None:
            before = guided
            mimic = d_u + plan.mimic_scale * delta
            if keep is None:
                guided = dynamic_threshold(guided, mimic, plan.dynthres)
            else:
                guided = _threshold_cfgpp(guided, mimic, d_u, keep, plan.dynthres)
            if checking:
                self.effects.measure("dynamic thresholding", before, guided,
                                     "the guided prediction's spread is within the mimic scale's")
        if plan.rescale_phi:
            before = guided
            guided = cfg_rescale(guided, d_u + delta, plan.rescale_phi, x=x.to(work), sigma=sigma, space=self.rescale_space)
            if checking:
                self.effects.measure("CFG rescale", before, guided, "the guided prediction already has the cond's spread")
        self.cfgpp_state.record(d_u.to(out_dtype))
        return guided.to(out_dtype)

    # -- proof of effect (see effect.py) --------------------------------------------------------
    def _check_hooks(self, plan: StepPlan) -> None:
        for method, on in (("NAG", plan.nag), ("FreeU", plan.freeu)):
            if on and self.effects.pending(method):
                self.effects.resolve_hooks([method])
                if self.effects.pending(method):
                    self.effects.resolve(method, False, 0.0,
                                         "its hook reported nothing this step: not installed, or never reached")

    def _check_term(self, method: str, term: torch.Tensor, d_cond_eff: torch.Tensor) -> None:
        self.effects.measure(method, d_cond_eff, d_cond_eff + term,
                             "its perturbed rows equal the cond rows (perturbation hook not reached?)")

    def _why_no_cfg_effect(self, has_uncond: bool, plan: StepPlan, w: float) -> str:
        if not has_uncond:
            return "no uncond prediction (c ≡ u, or the host skipped it), so there is no CFG direction"
        if w == 1.0:
            return "the CFG scale is 1 this step"
        return "with these settings it equals plain CFG"

    def _check_interval(self, has_uncond: bool) -> None:
        if self.cfg_scale == 1.0:
            self.effects.resolve("CFG interval", False, 0.0, "the CFG scale is 1: there is no guidance to limit")
        elif self.same_cond:
            self.effects.resolve("CFG interval", False, 0.0, "c ≡ u: CFG has no direction to remove")
        else:
            # The uncond the interval saves was not run, so the removed term (w − 1)·Δ is not
            # measured; it is not zero, since c ≢ u and w ≠ 1.
            self.effects.resolve("CFG interval", True)

    def _cfgpp_keep(self) -> float:
        """1 − r of this call's CFG++ step (r = σ_tgt/σ, said by the sampler before the call)."""
        ratio = self.cfgpp_state.renoise_ratio
        if ratio is None:
            raise BadParameterError(
                "CFG++ with dynamic thresholding needs the sampler's next σ: use a CFG++ sampler of "
                "lib_merge.guidance.cfgpp (they call cfgpp_state.begin(σ, σ_next) before each model call)"
            )
        # A step that does not move (σ_tgt = σ) has no CFG-equivalent scale; bound it instead:
        # the mapped-back result then stays at D_u, and x_next = x as the step itself says.
        return max(1.0 - ratio, 1e-6)


def _threshold_cfgpp(guided: torch.Tensor, mimic: torch.Tensor, d_u: torch.Tensor, keep: float, config) -> torch.Tensor:
    """Dynamic thresholding of a CFG++ step, defined on the CFG-scale axis its mimic scale uses.

    A first-order CFG++ step ``x_next = D_λ + r(x − D_u)`` equals a plain step
    ``x_next = D + r(x − D)`` with ``D = D_u + (D_λ − D_u)/(1 − r)`` (CFG scale ω = λ/(1 − r),
    arXiv 2406.08070, derived). So threshold that D against the mimic target, as dynthres does for
    plain CFG at ω, and map the result back to the CFG++ form ``D_u + (1 − r)(D′ − D_u)``.
    """
    equivalent = d_u + (guided - d_u) / keep
    return d_u + keep * (dynamic_threshold(equivalent, mimic, config) - d_u)
