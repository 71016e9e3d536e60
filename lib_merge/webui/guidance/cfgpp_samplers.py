"""Our CFG++ samplers in the host's sampler list, and the guided denoiser they need.

CFG++ renoises with the unconditional prediction D_u, which only a guided denoiser records: the
samplers run ``lib_merge.guidance.cfgpp`` with the host's seeded noise and make sure such a
denoiser is installed even where the script did not run (``ensure_cfgpp_driver``). Forge kept
A1111's k-diffusion sampler classes, so one registration serves both hosts.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ...guidance import cfgpp as cfgpp_lib
from ...guidance.settings import GuidanceSettings
from .console import TITLE, log
from .guided_pass import installed_pass


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


# How the running host guides a pass the script did not set up: each adapter hands its own
# installer to ``register_samplers``, so this module never imports an adapter.
_install_without_script: Optional[Callable[[Any, GuidanceSettings], None]] = None


def register_samplers(install_without_script: Callable[[Any, GuidanceSettings], None]) -> list[str]:
    """Add our CFG++ samplers to the host's sampler list (at import, before the UI lists them);
    ``install_without_script(model, settings)`` guides a CFG++ pass where the script did not run.

    Forge has ``sd_samplers.add_sampler``; A1111 1.10 does not, so we append to ``all_samplers``,
    set ``all_samplers_map`` in place and call ``set_samplers()``. Re-running (Reload UI) replaces
    our entries instead of duplicating them. Never raises: a host without these modules gets one line.
    """
    global _install_without_script
    _install_without_script = install_without_script
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
    if _install_without_script is None:
        log("CFG++ sampler: our samplers were not registered through a host adapter; cannot guide")
        return
    _install_without_script(model, settings)
