"""FreeU (Si et al., arXiv 2309.11497): reweight decoder backbone and skip features for free.

At each decoder block, before ``cat([h, h_skip])``: scale the first half of the backbone channels
by b (v1: uniformly; v2 "structure-aware": more where the channel-mean activation is high), and
scale the lowest spatial frequencies of the skip features by s. Stage 1 is the 4·model_channels
level (b1, s1), stage 2 the 2·model_channels level (b2, s2); other levels are untouched.

The FFT runs in float32 (cuFFT rejects half precision for non-power-of-two sizes). Devices whose
FFT fails (MPS, DirectML, some old GPUs) fall back to the CPU, with one warning per process.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..errors import BadParameterError
from .cfg import append_dims

# Device types whose FFT failed once; later calls go straight to the CPU instead of failing again.
_cpu_fallback: set[str] = set()


@functools.lru_cache(maxsize=64)
def _lowpass_mask(h: int, w: int, threshold: int, scale: float, device: str) -> torch.Tensor:
    centred = torch.ones((h, w), dtype=torch.float32)
    ch, cw = h // 2, w // 2
    centred[max(ch - threshold, 0) : ch + threshold, max(cw - threshold, 0) : cw + threshold] = scale
    natural = torch.fft.ifftshift(centred)
    # FreeU keeps Re(iFFT(M·F)); for a real map that equals filtering with the Hermitian part of M,
    # (M(k) + M(−k))/2, which is what lets a half-spectrum real FFT give the identical result.
    mirrored = torch.roll(torch.flip(natural, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    return ((natural + mirrored) / 2)[:, : w // 2 + 1].to(device)


def _fft_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    mask = _lowpass_mask(h, w, threshold, float(scale), str(x.device))
    return torch.fft.irfft2(torch.fft.rfft2(x) * mask, s=(h, w))


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred (2t)×(2t) low-frequency box of FFT2(x) by s, keep the real part (FreeU arXiv 2309.11497, skip features)."""
    work = x.float()
    if work.device.type not in _cpu_fallback:
        try:
            return _fft_filter(work, threshold, scale).to(x.dtype)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if work.device.type == "cpu":
                raise
            _cpu_fallback.add(work.device.type)
            warnings.warn(
                f"FreeU: FFT failed on {work.device} ({err}); computing it on the CPU from now on",
                RuntimeWarning,
                stacklevel=2,
            )
    return _fft_filter(work.cpu(), threshold, scale).to(device=x.device, dtype=x.dtype)


def backbone_factor(h: torch.Tensor, b: float, version: int):
    """Multiplier for h[:, :C/2]: b (v1) or 1 + (b−1)·α, α = per-image min-max-normalised channel mean (v2) (FreeU arXiv 2309.11497)."""
    if version == 1:
        return b
    mean = h.float().mean(dim=1, keepdim=True)
    flat = mean.flatten(1)
    lo = append_dims(flat.amin(dim=1), mean.ndim)
    span = append_dims(flat.amax(dim=1), mean.ndim) - lo
    # A constant map has no structure to follow: α = 0 there leaves it unscaled instead of NaN.
    alpha = torch.where(span > 0, (mean - lo) / span.clamp_min(torch.finfo(span.dtype).tiny), torch.zeros_like(mean))
    return (b - 1.0) * alpha + 1.0


def backbone_scale(h: torch.Tensor, b: float, version: int) -> torch.Tensor:
    """h[:, :C/2] ← factor·h[:, :C/2] with ``backbone_factor`` (FreeU arXiv 2309.11497, backbone scaling)."""
    half = h.shape[1] // 2
    out = h.clone()
    out[:, :half] = (h[:, :half].float() * backbone_factor(h, b, version)).to(h.dtype)
    return out


def freeu_stage(channels: int, *, model_channels: int, b1: float, b2: float, s1: float, s2: float):
    """(b, s) for a decoder block whose backbone has ``channels`` channels, or None outside both stages."""
    if channels == model_channels * 4:
        return b1, s1
    if channels == model_channels * 2:
        return b2, s2
    return None


def freeu_patch(
    h: torch.Tensor,
    hsp: torch.Tensor,
    *,
    model_channels: int,
    b1: float,
    b2: float,
    s1: float,
    s2: float,
    version: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one decoder block: (h, h_skip) → (b-scaled h, s-filtered h_skip), stage chosen by h's channels (arXiv 2309.11497).

    Same contract as a Forge ``set_model_output_block_patch`` patch, which the adapter wraps as
    ``lambda h, hsp, transformer_options: freeu_patch(h, hsp, model_channels=..., ...)``.
    """
    if version not in (1, 2):
        raise BadParameterError(f"freeu_version={version!r}: choose 1 or 2")
    stage = freeu_stage(h.shape[1], model_channels=model_channels, b1=b1, b2=b2, s1=s1, s2=s2)
    if stage is None:
        return h, hsp
    b, s = stage
    # Neutral factors are skipped so b = s = 1 is an exact identity and costs nothing.
    if b != 1.0:
        h = backbone_scale(h, b, version)
    if s != 1.0:
        hsp = fourier_filter(hsp, threshold=1, scale=s)
    return h, hsp
