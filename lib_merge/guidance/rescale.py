"""CFG rescale (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed").

Implementations disagree on the space the standard deviations are matched in (the paper: the
v-prediction output; ComfyUI: a v-like space; diffusers: the raw model output; the A1111
extension: D). Results differ, so the space is a named choice and the infotext records it.
We use ``"v"`` by default: it is the paper's space, it behaves like x0-space at high noise and like
ε-space at low noise, and it matches ComfyUI's ``RescaleCFG`` for an ε model.

Each space is ``u = offset − D`` times a positive per-image factor, which cancels in the std
ratio. So only the offset matters, and no division by σ is needed (stable at any σ):
``x0``: 0; ``eps``: x; ``v``: x/(σ²+1) (v = (x/(σ²+1) − D)·√(σ²+1)/σ for VE x = x0 + σε).
"""
from __future__ import annotations

import torch

from ..errors import BadParameterError
from .cfg import append_dims

RESCALE_SPACES = ("v", "eps", "x0")
# The space the guidance stack uses; infotext writers should record it next to the phi value.
RESCALE_SPACE = "v"


def _offset(space: str, x: torch.Tensor | None, sigma: torch.Tensor | None, like: torch.Tensor):
    if space == "x0":
        return torch.zeros((), dtype=like.dtype, device=like.device)
    if x is None or (space == "v" and sigma is None):
        raise BadParameterError(f"cfg_rescale space={space!r} needs x and sigma (use space='x0' without them)")
    if space == "eps":
        return x.to(like.dtype)
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(like.shape[0])
    return x.to(like.dtype) / append_dims(sigma * sigma + 1.0, like.ndim)


def _std_per_image(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).std(dim=1)


def cfg_rescale(
    d_guided: torch.Tensor,
    d_cond: torch.Tensor,
    phi: float,
    *,
    x: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    space: str = RESCALE_SPACE,
) -> torch.Tensor:
    """x = φ·x_cfg·std(x_c)/std(x_cfg) + (1−φ)·x_cfg, per-image std over (C,H,W), in ``space`` (Lin et al. arXiv 2305.08891 Alg. 2)."""
    if space not in RESCALE_SPACES:
        raise BadParameterError(f"cfg_rescale space={space!r}: choose one of {', '.join(RESCALE_SPACES)}")
    if not 0.0 <= phi <= 1.0:
        raise BadParameterError(f"cfg_rescale phi={phi!r}: must be within [0, 1]")
    if phi == 0.0:
        return d_guided
    offset = _offset(space, x, sigma, d_guided)
    u_guided = offset - d_guided
    u_cond = offset - d_cond
    std_guided = _std_per_image(u_guided)
    std_cond = _std_per_image(u_cond)
    # A flat guided prediction has no spread to match; leave it as it is rather than divide by 0.
    ratio = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(std_guided.dtype).tiny), 1.0)
    factor = append_dims(phi * ratio + (1.0 - phi), d_guided.ndim)
    return offset - u_guided * factor
