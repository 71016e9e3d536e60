"""CFG++ (Chung et al., arXiv 2406.08070): guide the x0 estimate, renoise with the uncond.

Samplers follow k-diffusion's shape ``sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None, ...)`` in the VE parametrisation ``x = x0 + σ·ε``. ``model(x, sigma, **extra_args)``
returns the guided prediction ``D_λ = D_u + λ(D_c − D_u)`` with λ ∈ [0, 1] as the paper defines
(no ÷12.5); the unconditional prediction ``D_u`` of the same call reaches the sampler through a
``CfgppState``:

* the sampler takes ``cfgpp_state=`` if given, else ``model.cfgpp_state``, and if the model has
  none it attaches a fresh one there (so a denoiser wrapper can always find it as
  ``self.cfgpp_state``);
* before each model call the sampler clears it and says where the step renoises to
  (``begin(σ, σ_tgt)``, see ``renoise_ratio``); during the call the denoiser stores the uncond
  x0 prediction of that call with ``state.record(d_uncond)`` (image-batch shape, D space). The
  A1111 adapter does it where it sees the uncond rows (``on_cfg_denoised`` / its CFGDenoiser), the
  Forge adapter in its post-CFG function (``args["uncond_denoised"]``, with the CFG-1 optimisation
  disabled); ``GuidanceStack.combine`` records it by itself;
* after the call the sampler reads it; a call that did not record one is an error, never a silent
  fallback to plain CFG.

Randomness for ancestral steps comes from ``noise_sampler(sigma, sigma_next)`` (pass the host's
seeded one) or, without it, ``torch.randn`` with an optional ``generator``. ``disable`` is
accepted for signature compatibility; progress is reported through ``callback``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class CfgppState:
    """Holder for the last uncond x0 prediction ``D_u``, filled by the denoiser, read by a CFG++ sampler."""

    def __init__(self) -> None:
        self.uncond: torch.Tensor | None = None
        self.renoise_ratio: float | None = None

    def record(self, d_uncond: torch.Tensor) -> None:
        self.uncond = d_uncond

    def clear(self) -> None:
        self.uncond = None
        self.renoise_ratio = None

    def begin(self, sigma: float, sigma_target: float) -> None:
        """A new model call of a step that renoises from σ to σ_tgt: r = σ_tgt/σ.

        Every first-order CFG++ step is ``x_next = D_λ + r·(x − D_u)``; the stack needs r to put
        λ on the CFG-scale axis (ω = λ/(1 − r)) where a method is defined on that axis."""
        self.clear()
        sigma, sigma_target = float(sigma), float(sigma_target)
        self.renoise_ratio = sigma_target / sigma if sigma > 0 else 0.0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """The recorded D_u, checked against the sampler's latent ``like``."""
        if self.uncond is None:
            raise TypeError(
                "CFG++ sampler: the model did not record the uncond prediction; its denoiser must call "
                "cfgpp_state.record(d_uncond) on every call (see lib_merge.guidance.cfgpp)"
            )
        if self.uncond.shape != like.shape:
            raise TypeError(f"CFG++ sampler: recorded uncond has shape {tuple(self.uncond.shape)}, latent is {tuple(like.shape)}")
        return self.uncond.to(like.dtype)


def cfgpp_state_of(model, explicit: CfgppState | None = None) -> CfgppState:
    """The state a sampler uses: ``explicit``, else ``model.cfgpp_state`` (attached if missing)."""
    if explicit is not None:
        return explicit
    state = getattr(model, "cfgpp_state", None)
    if state is None:
        state = CfgppState()
        model.cfgpp_state = state
    return state


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_up = min(σ_to, η·σ_to·√(σ_from²−σ_to²)/σ_from) (Karras et al. arXiv 2206.00364; DDIM η noise)."""
    if not eta or sigma_to == 0:
        return float(sigma_to), 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
    return math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0)), sigma_up


def cfgpp_equivalent_scale(lam: float, sigma: float, sigma_target: float) -> float:
    """ω = λ·σ/(σ − σ_tgt): plain-CFG scale reproducing a first-order CFG++ step (derived from arXiv 2406.08070)."""
    if sigma_target == 0:
        return float(lam)
    return lam * sigma / (sigma - sigma_target)


def _default_noise(x: torch.Tensor, generator: torch.Generator | None) -> Callable:
    def sample(_sigma, _sigma_next):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return sample


def _evaluate(model, x, sigma, extra_args, state: CfgppState, sigma_target):
    state.begin(sigma, sigma_target)
    d_guided = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
    return d_guided, state.take(x)


def _report(callback, x, i, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _ancestral_loop(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, generator, cfgpp_state):
    extra_args = {} if extra_args is None else extra_args
    state = cfgpp_state_of(model, cfgpp_state)
    noise_sampler = noise_sampler or _default_noise(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = get_ancestral_step(float(sigma), float(sigma_next), eta)
        d_guided, d_uncond = _evaluate(model, x, sigma, extra_args, state, sigma_down)
        _report(callback, x, i, sigma, d_guided)
        # x0 estimate from the guided prediction, direction back to noise from the uncond one.
        x = d_guided + (sigma_down / sigma) * (x - d_uncond)
        if sigma_up > 0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_euler_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, cfgpp_state=None):
    """x_next = D_λ + σ_next·(x − D_u)/σ (CFG++ arXiv 2406.08070, Euler form as ComfyUI ``euler_cfg_pp``)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, 0.0, 1.0, None, None, cfgpp_state)


@torch.no_grad()
def sample_euler_ancestral_cfgpp(
    model, x, sigmas, extra_args=None, callback=None, disable=None,
    eta=1.0, s_noise=1.0, noise_sampler=None, generator=None, cfgpp_state=None,
):
    """x_next = D_λ + σ_down·(x − D_u)/σ + s_noise·σ_up·z (CFG++ arXiv 2406.08070, ancestral Euler)."""
    return _ancestral_loop(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, generator, cfgpp_state)


@torch.no_grad()
def sample_ddim_cfgpp(
    model, x, sigmas, extra_args=None, callback=None, disable=None,
    eta=0.0, noise_sampler=None, generator=None, cfgpp_state=None,
):
    """DDIM(η) CFG++ in VE form: x̂0 = D_λ, direction √(σ_next²−σ_t²)·ε_u, noise σ_t·z (arXiv 2406.08070 DDIM CFG++)."""
    # DDIM's η noise, rewritten for x = x0 + σε, is exactly the ancestral (σ_down, σ_up) split.
    return _ancestral_loop(model, x, sigmas, extra_args, callback, eta, 1.0, noise_sampler, generator, cfgpp_state)


@torch.no_grad()
def sample_dpmpp_2m_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, cfgpp_state=None):
    """DPM++ 2M CFG++: x_next = e^{−h}(x − D_u) + D_λ + (1−e^{−h})/(2r)·(D_λ − D_u,prev) (arXiv 2406.08070 + Lu et al. 2211.01095)."""
    extra_args = {} if extra_args is None else extra_args
    state = cfgpp_state_of(model, cfgpp_state)
    d_uncond_prev = None
    h_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # The first-order part renoises by e^{-h} = σ_next/σ; the history term adds no ratio of its own.
        d_guided, d_uncond = _evaluate(model, x, sigma, extra_args, state, sigma_next)
        _report(callback, x, i, sigma, d_guided)
        if float(sigma_next) == 0:
            # The last step jumps to the guided x0 estimate (e^{-h} = 0).
            x = d_guided
            break
        h = math.log(float(sigma) / float(sigma_next))
        decay = math.exp(-h)
        x_next = decay * (x - d_uncond) + d_guided
        if d_uncond_prev is not None:
            r = h_prev / h
            x_next = x_next + (-math.expm1(-h)) / (2 * r) * (d_guided - d_uncond_prev)
        x = x_next
        d_uncond_prev, h_prev = d_uncond, h
    return x
