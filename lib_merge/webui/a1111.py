"""A1111 (v1.10) adapter of the Untitled Guidance script, plus what Forge shares with it.

One batched model forward per step. A1111's ``CFGDenoiser.forward`` builds ``x_in`` as
``[cond rows (one per AND sub-prompt)…, uncond rows (B)]`` and hands it to its inner model in one
call (``batch_cond_uncond``) or in chunks, always in row order. For the generation we replace,
on the sampler's own denoiser instance (``p.sampler.model_wrap_cfg``):

* ``forward``: swaps in the untitled conditioning, plans the step with the ``GuidanceStack``,
  installs the attention / FreeU hooks for this step and removes them in ``finally``;
* the inner model's ``forward`` (only during that call): each chunk it receives keeps its cond
  rows, keeps or drops its uncond rows as the plan says, and gets a copy of its cond rows per
  perturbed pass appended, so the U-Net runs ``[c…, u?, c_pag?, c_seg?]`` once; the outputs are
  split by explicit row index, the host gets back exactly the rows it asked for;
* ``combine_denoised``: the stack's combine (CFG, PAG, SEG, SANF, dynthres, rescale, CFG++).

This handles ``AND`` sub-prompts, batch > 1, skipped uncond rows (NGMS / skip early CFG: the host
then never sends uncond rows), ``batch_cond_uncond`` off (chunks), SDXL dict conds and
``c_concat`` image conditioning (every per-row tensor of the cond dict is indexed alike), and the
timestep samplers (DDIM, PLMS, UniPC: their denoiser works in ε, converted to x0 around the combine).

Forge (``forge.py``) reuses the sampler registration, the untitled conditioning and the
denoiser ``forward`` wrapper: Forge kept A1111's ``CFGDenoiser`` interface and ``prompt_parser``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from .. import untitled as untitled_lib
from ..errors import BadParameterError
from ..guidance import cfgpp as cfgpp_lib
from ..guidance.hooks import AttentionPerturbations, find_attention_layers, install_freeu
from ..guidance.settings import GuidanceSettings
from ..guidance.stack import GuidanceStack, StepPlan

TITLE = "Untitled Guidance"
_WRAP_ATTR = "_untitled_guidance_pass"

_logged: set[str] = set()


def log(message: str) -> None:
    print(f"[{TITLE}] {message}", flush=True)


def log_once(message: str) -> None:
    """One line per generation for things that would otherwise repeat every step."""
    if message not in _logged:
        _logged.add(message)
        log(message)


def new_generation() -> None:
    _logged.clear()


# ------------------------------------------------------------------------------- CFG++ samplers

def _host_noise(x: torch.Tensor):
    """Ancestral noise from the host's seeded generator: both hosts replace
    ``k_diffusion.sampling.torch`` by a hijack whose ``randn_like`` draws per-image seeded noise."""
    import k_diffusion.sampling

    def sample(_sigma, _sigma_next):
        return k_diffusion.sampling.torch.randn_like(x)

    return sample


def sample_euler_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    ensure_cfgpp_driver(model)
    return cfgpp_lib.sample_euler_cfgpp(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)


def sample_euler_ancestral_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0):
    ensure_cfgpp_driver(model)
    return cfgpp_lib.sample_euler_ancestral_cfgpp(
        model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, eta=eta, noise_sampler=_host_noise(x)
    )


def sample_dpmpp_2m_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    ensure_cfgpp_driver(model)
    return cfgpp_lib.sample_dpmpp_2m_cfgpp(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)


def sample_ddim_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0):
    ensure_cfgpp_driver(model)
    return cfgpp_lib.sample_ddim_cfgpp(
        model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, eta=eta, noise_sampler=_host_noise(x)
    )


# name -> (function, aliases, options, is_ddim). The host's own "DDIM CFG++" (λ = CFG/12.5, ε
# space; Forge never applies the /12.5) stays as it is; ours takes the paper's λ from the script.
CFGPP_SAMPLERS: dict[str, tuple[Callable, list[str], dict, bool]] = {
    "Euler CFG++": (sample_euler_cfgpp, ["k_euler_cfgpp"], {}, False),
    "Euler a CFG++": (sample_euler_ancestral_cfgpp, ["k_euler_a_cfgpp"], {"uses_ensd": True}, False),
    "DPM++ 2M CFG++": (sample_dpmpp_2m_cfgpp, ["k_dpmpp_2m_cfgpp"], {"scheduler": "karras"}, False),
    "DDIM CFG++ (lambda)": (sample_ddim_cfgpp, ["k_ddim_cfgpp_lambda"], {}, True),
}


def _sampler_data_list(sd_samplers_common, sd_samplers_kdiffusion) -> list:
    base = sd_samplers_kdiffusion.KDiffusionSampler

    class DdimCfgppSampler(base):
        """Our DDIM reads A1111's DDIM η setting (default 0), not the ancestral one (default 1)."""

        def __init__(self, funcname, sd_model, options=None):
            super().__init__(funcname, sd_model, options)
            self.eta_option_field = "eta_ddim"
            self.eta_infotext_field = "Eta DDIM"
            self.eta_default = 0.0

    out = []
    for name, (fn, aliases, options, is_ddim) in CFGPP_SAMPLERS.items():
        cls = DdimCfgppSampler if is_ddim else base
        out.append(sd_samplers_common.SamplerData(name, lambda model, fn=fn, cls=cls: cls(fn, model), aliases, options))
    return out


def register_samplers() -> list[str]:
    """Add our CFG++ samplers to the host's sampler list (at import, before the UI lists them).

    Forge has ``sd_samplers.add_sampler``; A1111 1.10 does not, so we append to ``all_samplers``,
    set ``all_samplers_map`` in place and call ``set_samplers()``. Re-running (Reload UI) replaces
    our entries instead of duplicating them. Never raises: a host without these modules gets one line.
    """
    try:
        from modules import sd_samplers, sd_samplers_common, sd_samplers_kdiffusion
    except Exception as err:  # not inside a WebUI, or a host that moved these modules
        log(f"CFG++ samplers not registered: this host has no k-diffusion sampler list ({err})")
        return []
    try:
        datas = _sampler_data_list(sd_samplers_common, sd_samplers_kdiffusion)
        if hasattr(sd_samplers, "add_sampler"):
            # Forge skips names it already has, so drop ours first (Reload UI brings new functions).
            sd_samplers.all_samplers[:] = [s for s in sd_samplers.all_samplers if s.name not in CFGPP_SAMPLERS]
            for data in datas:
                sd_samplers.add_sampler(data)
        else:
            sd_samplers.all_samplers[:] = [s for s in sd_samplers.all_samplers if s.name not in CFGPP_SAMPLERS] + datas
            sd_samplers.all_samplers_map.clear()
            sd_samplers.all_samplers_map.update({s.name: s for s in sd_samplers.all_samplers})
            sd_samplers.set_samplers()
        cached = getattr(sd_samplers, "get_sampler_and_scheduler", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()  # it is functools.cache'd and may have resolved our names to the default
    except Exception as err:
        log(f"CFG++ samplers not registered: {err}")
        return []
    return [d.name for d in datas]


def sampler_name_of(p) -> Optional[str]:
    config = getattr(getattr(p, "sampler", None), "config", None)
    return getattr(config, "name", None)


# ----------------------------------------------------------------------- untitled conditioning

_COND_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_COND_CACHE_SIZE = 8


def _autocast():
    try:
        from modules import devices

        return devices.autocast()
    except Exception:
        import contextlib

        return contextlib.nullcontext()


def compute_untitled_conds(model, mode: str, seeds: list[int], *, width: int, height: int, steps: int):
    """(cond, uncond) in the host's prompt_parser structures for ``mode``, cached per model and prompts.

    Built with the host's own ``prompt_parser`` from the untitled prompts, exactly as the host
    builds its conds (the negative marked negative, so SDXL zeroes an empty one like the host
    does); ``zero`` then zeroes the text parts (SDXL keeps its size/crop embeddings).
    """
    from modules import prompt_parser

    if mode == "gibberish":
        prompts = [untitled_lib.gibberish_prompt(int(s)) for s in seeds]
        negatives = [""] * len(seeds)
    else:
        prompts, negatives = untitled_lib.untitled_prompts(mode, 0, len(seeds))
    key = (id(model), getattr(model, "sd_model_hash", None), mode, tuple(prompts), int(width), int(height))
    if key in _COND_CACHE:
        _COND_CACHE.move_to_end(key)
        return _COND_CACHE[key]
    with torch.no_grad(), _autocast():
        cond = prompt_parser.get_multicond_learned_conditioning(
            model, prompt_parser.SdConditioning(prompts, width=width, height=height), steps
        )
        uncond = prompt_parser.get_learned_conditioning(
            model, prompt_parser.SdConditioning(negatives, is_negative_prompt=True, width=width, height=height), steps
        )
    if mode == "zero":
        for composables in cond.batch:
            for composable in composables:
                composable.schedules = [s._replace(cond=untitled_lib.zero_like_conditioning(s.cond)) for s in composable.schedules]
        uncond = [[s._replace(cond=untitled_lib.zero_like_conditioning(s.cond)) for s in schedules] for schedules in uncond]
    _COND_CACHE[key] = (cond, uncond)
    while len(_COND_CACHE) > _COND_CACHE_SIZE:
        _COND_CACHE.popitem(last=False)
    return cond, uncond


class Untitled:
    """The untitled conditioning of one sampling pass, recomputed if the model changes (refiner)."""

    def __init__(self, mode: str, seeds: list[int], width: int, height: int, steps: int, model_getter: Callable[[], Any]):
        self.mode, self.seeds, self.width, self.height, self.steps = mode, list(seeds), width, height, steps
        self.model_getter = model_getter

    def conds(self):
        return compute_untitled_conds(
            self.model_getter(), self.mode, self.seeds, width=self.width, height=self.height, steps=self.steps
        )

    def same_cond(self) -> bool:
        return untitled_lib.untitled_same_cond(self.mode, is_sdxl=bool(getattr(self.model_getter(), "is_sdxl", False)))


def untitled_for(p, settings: GuidanceSettings, model_getter: Callable[[], Any]) -> Optional[Untitled]:
    """The pass's untitled conditioning (computed now, before sampling, and cached), or None."""
    if settings.untitled == "off":
        return None
    hires = bool(getattr(p, "is_hr_pass", False))
    width = getattr(p, "hr_upscale_to_x", None) if hires else None
    height = getattr(p, "hr_upscale_to_y", None) if hires else None
    seeds = list(getattr(p, "seeds", None) or [getattr(p, "seed", 0)] * int(getattr(p, "batch_size", 1)))
    u = Untitled(settings.untitled, seeds, int(width or p.width), int(height or p.height), int(p.steps), model_getter)
    u.conds()
    return u


# -------------------------------------------------------------------------------- the step state

def conds_layout(cond) -> list[list[tuple[int, float]]]:
    """``conds_list`` of a MulticondLearnedConditioning without building tensors: rows are numbered
    in order, one per sub-prompt, as ``prompt_parser.reconstruct_multicond_batch`` does."""
    rows, out = 0, []
    for composables in cond.batch:
        entry = []
        for composable in composables:
            entry.append((rows, float(composable.weight)))
            rows += 1
        out.append(entry)
    return out


@dataclasses.dataclass
class StepContext:
    """What one denoiser call (one sampler step) runs, and what its forwards produced."""

    plan: StepPlan
    step: int
    n_cond: int
    n_images: int
    conds_list: list
    x: torch.Tensor
    sigma: torch.Tensor
    offset: int = 0  # host rows seen so far in this step (chunks arrive in row order)
    forwards: int = 0
    rows_run: int = 0
    cond_out: dict = dataclasses.field(default_factory=dict)
    pag_out: dict = dataclasses.field(default_factory=dict)
    seg_out: dict = dataclasses.field(default_factory=dict)
    # Forge: the step's compiled cond list, whether our rows can join Forge's forward, the
    # perturbed outputs of that forward, and the CFG scale Forge applied.
    forge_cond: Any = None
    batchable: bool = False
    in_fallback: bool = False
    extras: Optional[dict] = None
    host_scale: Optional[float] = None


def _take_rows(obj: Any, index: torch.Tensor, n: int) -> Any:
    """Index every per-row tensor (first dim ``n``) inside a cond structure (dicts, lists)."""
    if isinstance(obj, torch.Tensor):
        return obj[index] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _take_rows(v, index, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take_rows(v, index, n) for v in obj)
    return obj


def _gather(rows: dict, n: int) -> Optional[torch.Tensor]:
    if len(rows) != n or any(i not in rows for i in range(n)):
        return None
    return torch.stack([rows[i] for i in range(n)])


# -------------------------------------------------------------------------- the denoiser wrapper

class GuidedPass:
    """Guidance of one sampling pass on one host denoiser (``p.sampler.model_wrap_cfg``).

    Host-neutral part: binds the call, swaps in untitled conds, builds the stack on the first
    call (when the host has set ``steps``/``total_steps``), plans the step, keeps CFG++ fed.
    Subclasses run the call (``_run``) and install per-step model hooks.
    """

    def __init__(self, denoiser, settings: GuidanceSettings, *, hires: bool, untitled: Optional[Untitled] = None,
                 cfg_scale: Optional[float] = None, error: Optional[BaseException] = None):
        self.denoiser = denoiser
        self.settings = settings
        self.hires = hires
        self.untitled = untitled
        self.cfg_scale = cfg_scale
        self.error = error
        self.stack: Optional[GuidanceStack] = None
        self.current: Optional[StepContext] = None
        self.steps_seen = 0
        self.rows_per_step: list[int] = []
        self.forwards_per_step: list[int] = []

    # -- the host's step counter -> sampler step
    def step_index(self) -> int:
        d = self.denoiser
        call = int(getattr(d, "step", 0) or 0)
        steps = int(getattr(d, "steps", 0) or 0)
        total = int(getattr(d, "total_steps", 0) or 0)
        if steps > 0 and total > 0:
            # Second-order samplers make two calls per step (total = 2·steps).
            return min(call * steps // total, steps - 1)
        return call

    def total_steps(self) -> int:
        steps = int(getattr(self.denoiser, "steps", 0) or 0)
        return steps if steps > 0 else 1

    def make_stack(self, cond_scale: float) -> GuidanceStack:
        scale = self.cfg_scale if self.cfg_scale is not None else cond_scale * float(getattr(self.denoiser, "cond_scale_miltiplier", 1.0))
        same = self.untitled.same_cond() if self.untitled is not None else False
        stack = GuidanceStack(self.settings, self.total_steps(), hires=self.hires, cfg_scale=scale, untitled_same_cond=same)
        # A CFG++ sampler attached its state to the denoiser before the first call; feed that one.
        state = self.denoiser.__dict__.get("cfgpp_state")
        if state is not None:
            stack.cfgpp_state = state
        return stack

    def bind(self, orig: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        sig = self.__dict__.get("_signature")
        if sig is None:
            sig = self._signature = inspect.signature(orig)
        return sig.bind(*args, **kwargs)

    def row_layout(self, layout: Optional[list], n_images: int) -> tuple[int, list]:
        """(cond rows, conds_list) the host runs for this call; A1111 runs one row per sub-prompt."""
        if layout:
            return sum(len(e) for e in layout), layout
        return n_images, [[(i, 1.0)] for i in range(n_images)]

    def combine(self, orig_combine: Callable, *args, **kwargs):
        return orig_combine(*args, **kwargs)

    def forward(self, orig: Callable, *args, **kwargs):
        if self.error is not None:
            # Script hooks cannot fail a request (the runner swallows their exceptions); a model
            # call can, so a bad API request surfaces here, before any U-Net work.
            raise self.error
        bound = self.bind(orig, args, kwargs)
        a = bound.arguments
        if self.untitled is not None:
            cond, uncond = self.untitled.conds()
            x = a.get("x")
            if x is not None and len(cond.batch) != x.shape[0]:
                log_once(f"untitled: {len(cond.batch)} conds for a batch of {x.shape[0]}; prompt kept for this pass")
            else:
                a["cond"], a["uncond"] = cond, uncond
        if self.stack is None:
            self.stack = self.make_stack(float(a.get("cond_scale", 1.0)))
        step = self.step_index()
        layout = conds_layout(a["cond"]) if hasattr(a.get("cond"), "batch") else None
        force = bool(layout) and any(abs(sum(w for _, w in entry) - 1.0) > 1e-6 for entry in layout)
        plan = self.stack.plan(step, force_uncond=force)
        x, sigma = a["x"], a["sigma"]
        n_cond, conds_list = self.row_layout(layout, x.shape[0])
        ctx = StepContext(plan, step, n_cond, x.shape[0], conds_list, x, sigma)
        self.current = ctx
        handles = []
        try:
            handles = self.install_step_hooks(ctx)
            return self._run(orig, bound, ctx)
        finally:
            for handle in handles:
                handle.remove()
            self.current = None
            self.steps_seen += 1
            self.rows_per_step.append(ctx.rows_run)
            self.forwards_per_step.append(ctx.forwards)

    def install_step_hooks(self, ctx: StepContext) -> list:
        return []

    def _run(self, orig: Callable, bound: inspect.BoundArguments, ctx: StepContext):
        return orig(*bound.args, **bound.kwargs)


def install_pass(denoiser, guided: GuidedPass) -> GuidedPass:
    """Route ``denoiser.forward`` (and, for A1111 passes, ``combine_denoised``) through ``guided``.

    Per instance: the sampler's denoiser lives for one sampling pass, and the class (shared by
    every generation and extension) is never touched. Calling again on the same denoiser (Forge's
    two hires calls) swaps the pass without wrapping twice.
    """
    d = denoiser.__dict__
    already = d.get(_WRAP_ATTR) is not None
    d[_WRAP_ATTR] = guided
    if already:
        return guided
    orig_forward = denoiser.forward

    def forward(*args, **kwargs):
        return denoiser.__dict__[_WRAP_ATTR].forward(orig_forward, *args, **kwargs)

    d["forward"] = forward
    if hasattr(denoiser, "combine_denoised"):
        orig_combine = denoiser.combine_denoised

        def combine_denoised(*args, **kwargs):
            return denoiser.__dict__[_WRAP_ATTR].combine(orig_combine, *args, **kwargs)

        d["combine_denoised"] = combine_denoised
    return guided


def uninstall_pass(denoiser) -> None:
    for name in (_WRAP_ATTR, "forward", "combine_denoised"):
        denoiser.__dict__.pop(name, None)


def installed_pass(denoiser) -> Optional[GuidedPass]:
    return denoiser.__dict__.get(_WRAP_ATTR) if denoiser is not None else None


def ensure_cfgpp_driver(model) -> None:
    """Our CFG++ samplers need a denoiser that records D_u each call. The script installs one;
    where it did not run (``p.scripts`` None), guide this pass with λ = CFG/12.5 (A1111's DDIM CFG++ rule)."""
    guided = installed_pass(model)
    if guided is not None and guided.settings.cfgpp_on:
        return
    p = getattr(model, "p", None)
    cfg = float(getattr(p, "cfg_scale", 7.0) or 7.0)
    lam = min(max(cfg / 12.5, 0.05), 1.0)
    log(f"CFG++ sampler without the {TITLE} script: λ = CFG scale / 12.5 = {lam:.3f}")
    settings = GuidanceSettings(cfgpp=lam)
    if guided is not None:
        guided.settings = settings.replace(**{f: getattr(guided.settings, f) for f in GuidanceSettings.field_names() if f not in ("cfgpp", "cfgpp_hires")})
        guided.stack = None
        return
    host = _host_kind()
    if host == "forge":
        from . import forge

        forge.install_minimal_cfgpp(model, settings)
    else:
        install_pass(model, A1111Pass(model, settings, hires=bool(getattr(p, "is_hr_pass", False)), diffusion_model=None))


def _host_kind() -> str:
    import importlib.util

    return "forge" if importlib.util.find_spec("modules_forge") is not None else "a1111"


# ---------------------------------------------------------------------------------- A1111 pass

class A1111Pass(GuidedPass):
    """A1111: rows through the inner model's forward, hooks on the U-Net modules, our combine."""

    def __init__(self, denoiser, settings, *, hires, diffusion_model, untitled=None, rows_enabled=True,
                 pag_layers=(), seg_layers=(), model_channels=None, error=None):
        super().__init__(denoiser, settings, hires=hires, untitled=untitled, error=error)
        self.diffusion_model = diffusion_model
        self.rows_enabled = rows_enabled
        self.pag_layers = list(pag_layers)
        self.seg_layers = list(seg_layers)
        self.model_channels = model_channels
        self.perturb: Optional[AttentionPerturbations] = None
        self.eps_space = _is_timestep_denoiser(denoiser)

    def install_step_hooks(self, ctx: StepContext) -> list:
        handles = []
        plan = ctx.plan
        if self.diffusion_model is None:
            return handles
        self.perturb = None
        pag = self.pag_layers if "pag" in plan.roles else []
        seg = self.seg_layers if "seg" in plan.roles else []
        if pag or seg:
            self.perturb = AttentionPerturbations(
                pag, seg, pag_rows=None, seg_rows=None, seg_sigma=self.settings.seg_sigma, latent_hw=tuple(ctx.x.shape[-2:])
            )
            handles.append(self.perturb)
        if plan.freeu and self.model_channels:
            handles.append(install_freeu(self.diffusion_model, self.settings, model_channels=self.model_channels, active=lambda: True))
        return handles

    def _run(self, orig, bound, ctx):
        if not self.rows_enabled:
            return orig(*bound.args, **bound.kwargs)
        inner = getattr(self.denoiser, "inner_model", None)
        if not isinstance(inner, torch.nn.Module):
            if "pag" in ctx.plan.roles or "seg" in ctx.plan.roles:
                log_once("the sampler's inner model is not a torch module; PAG/SEG skipped")
            return orig(*bound.args, **bound.kwargs)
        inner_orig = inner.forward
        had_own = "forward" in inner.__dict__

        def forward(*args, **kwargs):
            return self.inner_call(inner_orig, ctx, *args, **kwargs)

        inner.__dict__["forward"] = forward
        try:
            return orig(*bound.args, **bound.kwargs)
        finally:
            if had_own:
                inner.__dict__["forward"] = inner_orig
            else:
                inner.__dict__.pop("forward", None)

    def inner_call(self, inner_orig, ctx: StepContext, x_in, sigma_in, *args, **kwargs):
        """One chunk of the host's rows -> one forward with our rows; returns the host's rows."""
        plan = ctx.plan
        n = x_in.shape[0]
        lo = ctx.offset
        ctx.offset += n
        n_cond, n_img = ctx.n_cond, ctx.n_images
        cond_local = [i for i in range(n) if lo + i < n_cond]
        uncond_local = [i for i in range(n) if n_cond <= lo + i < n_cond + n_img]
        other = [i for i in range(n) if lo + i >= n_cond + n_img]
        run_uncond = "uncond" in plan.roles
        keep = sorted(cond_local + (uncond_local if run_uncond else []) + other)
        pag_src = cond_local if "pag" in plan.roles else []
        seg_src = cond_local if "seg" in plan.roles else []
        index = keep + pag_src + seg_src

        if index == list(range(n)):
            out = inner_orig(x_in, sigma_in, *args, **kwargs)
            ctx.forwards += 1
            ctx.rows_run += n
        else:
            out = torch.empty_like(x_in)
            if index:
                idx = torch.tensor(index, device=x_in.device, dtype=torch.long)
                perturb = self.perturb
                if perturb is not None:
                    perturb.set_latent_hw(tuple(x_in.shape[-2:]))
                    start = len(keep)
                    perturb.set_rows(
                        pag_rows=slice(start, start + len(pag_src)) if pag_src else None,
                        seg_rows=slice(start + len(pag_src), len(index)) if seg_src else None,
                        batch_size=len(index),
                    )
                try:
                    res = inner_orig(x_in[idx], sigma_in[idx], *_take_rows(args, idx, n), **_take_rows(kwargs, idx, n))
                finally:
                    if perturb is not None:
                        perturb.set_rows(pag_rows=None, seg_rows=None)
                ctx.forwards += 1
                ctx.rows_run += len(index)
                out = out.to(res.dtype)
                if keep:
                    out[keep] = res[: len(keep)]
                for j, i in enumerate(pag_src):
                    ctx.pag_out[lo + i] = res[len(keep) + j]
                for j, i in enumerate(seg_src):
                    ctx.seg_out[lo + i] = res[len(keep) + len(pag_src) + j]
        for i in cond_local:
            ctx.cond_out[lo + i] = out[i]
        if not run_uncond:
            # The host expects uncond rows back; with c ≡ u (or nothing reading D_u) they are the
            # image's first cond row, as A1111 itself fills skipped uncond rows.
            for i in uncond_local:
                first = ctx.conds_list[lo + i - n_cond][0][0]
                if first in ctx.cond_out:
                    out[i] = ctx.cond_out[first]
        return out

    def combine(self, orig_combine, x_out, conds_list, uncond, cond_scale, *rest, **kwargs):
        ctx = self.current
        if ctx is None or self.stack is None:
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)
        plan = ctx.plan
        n_img = ctx.n_images
        n_cond = x_out.shape[0] - n_img
        # Rows the host itself skipped (NGMS, skip early CFG): it combines at scale 1 then.
        host_skipped = self.rows_enabled and ctx.offset < ctx.n_cond + n_img
        if plan.is_trivial and not host_skipped:
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)
        d_pag = _gather(ctx.pag_out, n_cond) if plan.pag_scale else None
        d_seg = _gather(ctx.seg_out, n_cond) if plan.seg_scale else None
        if plan.pag_scale and d_pag is None:
            log_once("PAG rows were not produced this step (another extension replaced the model call?); PAG skipped there")
            plan = dataclasses.replace(plan, pag_scale=0.0, sanf=False)
        if plan.seg_scale and d_seg is None:
            log_once("SEG rows were not produced this step; SEG skipped there")
            plan = dataclasses.replace(plan, seg_scale=0.0)
        d_cond = x_out[:n_cond]
        d_uncond = None if (host_skipped or "uncond" not in plan.roles) else x_out[n_cond:]
        x, sigma = ctx.x, ctx.sigma
        try:
            if self.eps_space:
                return self._combine_eps(plan, ctx, d_cond, d_uncond, d_pag, d_seg, conds_list)
            return self.stack.combine(plan, ctx.step, x=x, sigma=sigma, d_cond=d_cond, d_uncond=d_uncond,
                                      d_pag=d_pag, d_seg=d_seg, conds_list=conds_list)
        except (BadParameterError, RuntimeError, ValueError) as err:
            # Our combine failing (an odd batch another extension built?) must not end the image.
            log_once(f"guidance could not combine this step ({err}); plain CFG used there")
            self.stack.cfgpp_state.record(x_out[n_cond:] if d_uncond is not None else x_out[:n_img])
            return orig_combine(x_out, conds_list, uncond, cond_scale, *rest, **kwargs)

    def _combine_eps(self, plan, ctx, d_cond, d_uncond, d_pag, d_seg, conds_list):
        """Timestep denoisers predict ε of x_t = √ᾱ·x0 + √(1−ᾱ)·ε: combine in x0, in VE form
        (x/√ᾱ = x0 + σε, σ = √((1−ᾱ)/ᾱ)), then back to ε; linear terms are unchanged by this."""
        alphas = self.denoiser.alphas
        t = ctx.sigma.to(dtype=torch.long, device=alphas.device)
        a = alphas[t].to(ctx.x.device, torch.float32)
        row_img = [img for img, entry in enumerate(ctx.conds_list) for _ in entry]

        def to_x0(eps, images):
            ai = a[images][:, None, None, None]
            return ((ctx.x[images].float() - (1 - ai).sqrt() * eps.float()) / ai.sqrt())

        rows = torch.tensor(row_img, device=ctx.x.device)
        all_img = torch.arange(ctx.n_images, device=ctx.x.device)
        x0_c = to_x0(d_cond, rows)
        x0_u = to_x0(d_uncond, all_img) if d_uncond is not None else None
        x0_p = to_x0(d_pag, rows) if d_pag is not None else None
        x0_s = to_x0(d_seg, rows) if d_seg is not None else None
        a4 = a[:, None, None, None]
        x_ve = ctx.x.float() / a4.sqrt()
        sigma_ve = ((1 - a) / a).sqrt()
        denoised = self.stack.combine(plan, ctx.step, x=x_ve, sigma=sigma_ve, d_cond=x0_c, d_uncond=x0_u,
                                      d_pag=x0_p, d_seg=x0_s, conds_list=conds_list)
        eps = (ctx.x.float() - a4.sqrt() * denoised.float()) / (1 - a4).sqrt()
        return eps.to(d_cond.dtype)


def _is_timestep_denoiser(denoiser) -> bool:
    try:
        from modules import sd_samplers_timesteps

        return isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    except Exception:
        return False


# ---------------------------------------------------------------------------- per-pass preparing

def effective_settings(p, settings: GuidanceSettings) -> GuidanceSettings:
    """Settings for this pass after the checks every host shares (CFG++ needs a CFG++ sampler)."""
    name = sampler_name_of(p)
    if name in CFGPP_SAMPLERS:
        if not settings.cfgpp_on:
            cfg = float(getattr(p, "cfg_scale", 7.0))
            lam = min(max(cfg / 12.5, 0.05), 1.0)
            log_once(f"{name} needs a CFG++ λ; none set in {TITLE}, using CFG scale / 12.5 = {lam:.3f}")
            settings = settings.replace(cfgpp=lam)
        # The sampler renoises with D_u in every pass it runs, hires included.
        settings = settings.replace(cfgpp_hires=True)
    elif settings.cfgpp_on:
        log_once(f"CFG++ skipped: sampler {name!r} is not a CFG++ sampler; choose one of {', '.join(CFGPP_SAMPLERS)}"
                 + (" (the host's 'DDIM CFG++' uses CFG/12.5 as its own λ)" if name == "DDIM CFG++" else ""))
        settings = settings.replace(cfgpp=0.0)
    return settings


def resolve_layers(diffusion_model, settings: GuidanceSettings) -> tuple[GuidanceSettings, list, list]:
    """The attn1 modules PAG and SEG perturb; a spec or U-Net layout we cannot use -> one line, method off."""
    pag_layers, seg_layers = [], []
    if settings.pag_on:
        try:
            pag_layers = find_attention_layers(diffusion_model, settings.pag_layers)
        except BadParameterError as err:
            log(f"PAG skipped: {err}")
            settings = settings.replace(pag_scale=0.0)
    if settings.seg_on:
        try:
            seg_layers = find_attention_layers(diffusion_model, settings.seg_layers)
        except BadParameterError as err:
            log(f"SEG skipped: {err}")
            settings = settings.replace(seg_scale=0.0)
    return settings, pag_layers, seg_layers


def _model_channels(diffusion_model) -> Optional[int]:
    value = getattr(diffusion_model, "model_channels", None)
    if value is None:
        config = getattr(diffusion_model, "config", None)
        if isinstance(config, dict):
            value = config.get("model_channels")
    return int(value) if value else None


def prepare_sampling(p, settings: GuidanceSettings, *, error: Optional[BaseException] = None) -> Optional[A1111Pass]:
    """``process_before_every_sampling`` on A1111: guide the sampler about to run. Never raises."""
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    hires = bool(getattr(p, "is_hr_pass", False))
    if denoiser is None or not hasattr(denoiser, "forward"):
        if settings.any_on or error is not None:
            log("this host has no p.sampler.model_wrap_cfg to hook; guidance skipped")
        return None
    if error is not None:
        return install_pass(denoiser, A1111Pass(denoiser, settings, hires=hires, diffusion_model=None, rows_enabled=False, error=error))
    settings = effective_settings(p, settings)
    if not settings.any_on:
        return None
    from modules import shared

    model = shared.sd_model
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    rows_enabled = True
    if getattr(model, "cond_stage_key", None) == "edit":
        log_once("InstructPix2Pix checkpoints batch three blocks of rows: only FreeU is applied")
        settings = GuidanceSettings(**{f: getattr(settings, f) for f in GuidanceSettings.field_names() if f.startswith("freeu_")})
        rows_enabled = False
    if _unet_replaced():
        log_once("a replacement U-Net (sd_unet, e.g. TensorRT) runs instead of the torch modules: PAG, SEG and FreeU skipped")
        settings = settings.replace(pag_scale=0.0, seg_scale=0.0, freeu_enabled=False)
    pag_layers = seg_layers = []
    channels = None
    if diffusion_model is None:
        if settings.pag_on or settings.seg_on or settings.freeu_enabled:
            log("no shared.sd_model.model.diffusion_model on this host: PAG, SEG and FreeU skipped")
        settings = settings.replace(pag_scale=0.0, seg_scale=0.0, freeu_enabled=False)
    else:
        settings, pag_layers, seg_layers = resolve_layers(diffusion_model, settings)
        if settings.freeu_enabled:
            channels = _model_channels(diffusion_model)
            if channels is None:
                log("FreeU skipped: the U-Net does not say its model_channels")
                settings = settings.replace(freeu_enabled=False)
    untitled = None
    if settings.untitled != "off":
        try:
            untitled = untitled_for(p, settings, lambda: shared.sd_model)
        except Exception as err:  # a text encoder that cannot encode our prompts must not stop the image
            log(f"untitled skipped: could not build its conditioning ({err})")
            settings = settings.replace(untitled="off")
    if not settings.any_on:
        return None
    guided = A1111Pass(denoiser, settings, hires=hires, diffusion_model=diffusion_model, untitled=untitled,
                       rows_enabled=rows_enabled, pag_layers=pag_layers, seg_layers=seg_layers, model_channels=channels)
    return record_pass(p, install_pass(denoiser, guided))


def _unet_replaced() -> bool:
    try:
        from modules import sd_unet

        return getattr(sd_unet, "current_unet", None) is not None
    except Exception:
        return False


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


def finish(p) -> None:
    """``postprocess_batch``: restore the sampler's denoiser (hooks on the U-Net never outlive a
    model call) and print what ran."""
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    if denoiser is not None:
        uninstall_pass(denoiser)
    passes = p.__dict__.pop(_PASSES_ATTR, [])
    line = summary_line(passes, len(getattr(p, "seeds", None) or [0]))
    if line:
        print(line, flush=True)
