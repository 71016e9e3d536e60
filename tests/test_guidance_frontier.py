"""The guidance-frontier functions against their sanity identities and independent re-derivations."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib_merge.guidance.apg import ApgMomentum, apg_combine
from lib_merge.guidance.cfg_zero import cfg_zero_star, optimized_scale
from lib_merge.guidance.fdg import fdg_combine, high_pass, low_pass
from lib_merge.guidance.interval import SigmaInterval
from lib_merge.guidance.mahiro import mahiro
from lib_merge.guidance.nag import multihead_attention, nag_attention
from lib_merge.guidance.skimmed import skimmed_combine, skimmed_predictions
from lib_merge.guidance.tcfg import tcfg_uncond
from lib_merge.errors import BadParameterError

SHAPE = (2, 4, 6, 5)


def _t(seed, shape=SHAPE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cfg(c, u, w):
    return u + w * (c - u)


# --- APG -------------------------------------------------------------------------------------


def _apg_by_hand(c, u, w, eta, r, factor):
    """Per image, flattened, float64: clip, project on D_c, recombine (arXiv 2410.02416 Alg. 1)."""
    out = torch.empty_like(c)
    for b in range(c.shape[0]):
        g, cb = (c[b] - u[b]).flatten(), c[b].flatten()
        n = g.norm()
        if r > 0 and n > r:
            g = g * (r / n)
        par = (g @ cb) / (cb @ cb) * cb
        out[b] = (cb + factor(w) * ((g - par) + eta * par)).reshape(c.shape[1:])
    return out


@pytest.mark.parametrize("eta,r", [(0.0, 0.0), (0.3, 4.0), (-1.5, 0.5)])
def test_apg_matches_a_per_image_rederivation(eta, r):
    c, u = _t(1), _t(2)
    paper, _ = apg_combine(c, u, 6.0, eta=eta, norm_threshold=r)
    comfy, _ = apg_combine(c, u, 6.0, eta=eta, norm_threshold=r, form="comfyui")
    assert torch.allclose(paper, _apg_by_hand(c, u, 6.0, eta, r, lambda w: w - 1), atol=1e-10)
    assert torch.allclose(comfy, _apg_by_hand(c, u, 6.0, eta, r, lambda w: w), atol=1e-10)


def test_apg_identities():
    c, u = _t(1), _t(2)
    # η = 1, no clip, no momentum: the paper form is CFG(w), ComfyUI's is CFG(w + 1).
    assert torch.equal(apg_combine(c, u, 6.0, eta=1.0, norm_threshold=0.0)[0], c + 5.0 * (c - u))
    assert torch.allclose(apg_combine(c, u, 6.0, eta=1.0, norm_threshold=0.0, form="comfyui")[0], _cfg(c, u, 7.0))
    # Δ parallel to D_c and η = 0: nothing is left of the update.
    assert torch.allclose(apg_combine(c, c - 0.3 * c, 9.0, eta=0.0, norm_threshold=0.0)[0], c, atol=1e-12)
    # A vanishing norm threshold leaves D_c; CFG 1 is D_c in both forms.
    assert torch.allclose(apg_combine(c, u, 9.0, eta=0.5, norm_threshold=1e-12)[0], c, atol=1e-9)
    for form in ("paper", "comfyui"):
        assert torch.equal(apg_combine(c, u, 1.0, eta=0.0, norm_threshold=5.0, form=form)[0], c)
    # Per image: a batch of two gives each image its own result.
    both, _ = apg_combine(c, u, 5.0, eta=0.2, norm_threshold=3.0)
    one, _ = apg_combine(c[1:], u[1:], 5.0, eta=0.2, norm_threshold=3.0)
    assert torch.allclose(both[1:], one, atol=1e-12)
    with pytest.raises(BadParameterError, match="apg_form"):
        apg_combine(c, u, 5.0, eta=0.0, norm_threshold=0.0, form="diffusers")


def test_apg_momentum_uses_the_previous_buffer():
    c1, u1, c2, u2 = _t(1), _t(2), _t(3), _t(4)
    _, m1 = apg_combine(c1, u1, 5.0, eta=1.0, norm_threshold=0.0, momentum=-0.5)
    out, m2 = apg_combine(c2, u2, 5.0, eta=1.0, norm_threshold=0.0, momentum=-0.5, previous=m1)
    assert torch.allclose(m2, (c2 - u2) - 0.5 * (c1 - u1))
    assert torch.allclose(out, c2 + 4.0 * m2)


def test_apg_momentum_commits_once_per_sampler_step():
    state = ApgMomentum()
    deltas = {}
    # Calls of steps 0, 0, 1, 1, 2 (a second-order sampler): the first call of each step commits.
    for call, step in enumerate([0, 0, 1, 1, 2]):
        prev = state.previous(step, _t(0))
        deltas[call] = _t(10 + call)
        buffer = deltas[call] if prev is None else -0.5 * prev + deltas[call]
        state.record(step, buffer)
        if call == 4:
            # m_1 = β·m_0 + Δ of step 1's first call; the second calls (1 and 3) never wrote.
            assert torch.allclose(prev, deltas[2] - 0.5 * deltas[0])
    # A pass restarting at step 0 starts with an empty buffer.
    assert state.previous(0, _t(0)) is None


# --- CFG-Zero* -------------------------------------------------------------------------------


def test_cfg_zero_star_matches_the_official_velocity_form():
    x, c, u = _t(0) * 3, _t(1), _t(2)
    w = 5.0
    v_c, v_u = x - c, x - u
    s = (v_c * v_u).flatten(1).sum(1) / ((v_u * v_u).flatten(1).sum(1) + 1e-8)
    s = s[:, None, None, None]
    v_hat = s * v_u + w * (v_c - s * v_u)
    assert torch.allclose(cfg_zero_star(x, c, u, w), x - v_hat, atol=1e-10)
    comfy = cfg_zero_star(x, c, u, w, form="comfyui")
    assert torch.allclose(comfy, s * u + w * (c - s * u), atol=1e-10)
    # ComfyUI's form is the paper's plus (w − 1)(1 − s*)·x, exactly.
    assert torch.allclose(comfy - cfg_zero_star(x, c, u, w), (w - 1) * (1 - s) * x, atol=1e-10)


def test_cfg_zero_star_identities():
    x, c, u = _t(0) * 3, _t(1), _t(2)
    assert torch.equal(cfg_zero_star(x, c, u, 5.0, optimized=False), _cfg(c, u, 5.0))
    # s* = 1 (g_c = g_u + something orthogonal to g_u): both forms are CFG.
    g_u = x - u
    other = _t(7)
    flat_g, flat_o = g_u.flatten(1), other.flatten(1)
    flat_o = flat_o - ((flat_o * flat_g).sum(1, keepdim=True) / (flat_g * flat_g).sum(1, keepdim=True)) * flat_g
    c1 = x - (g_u + flat_o.reshape(g_u.shape))
    assert torch.allclose(optimized_scale(x - c1, g_u).flatten(), torch.ones(2, dtype=torch.float64), atol=1e-9)
    for form in ("paper", "comfyui"):
        assert torch.allclose(cfg_zero_star(x, c1, u, 5.0, form=form), _cfg(c1, u, 5.0), atol=1e-6)
    # g_c = k·g_u: the paper form returns D_c for any w.
    c2 = x - 0.7 * g_u
    assert torch.allclose(cfg_zero_star(x, c2, u, 9.0), c2, atol=1e-6)
    assert torch.allclose(cfg_zero_star(x, c, u, 1.0), c, atol=1e-10)


# --- TCFG ------------------------------------------------------------------------------------


def test_tcfg_matches_an_svd_per_image():
    x, c, u = _t(0), _t(1), _t(2)
    out = tcfg_uncond(x, c, u)
    for b in range(2):
        a = torch.stack([(x[b] - u[b]).flatten(), (x[b] - c[b]).flatten()])
        _, _, vh = torch.linalg.svd(a, full_matrices=False)
        v1 = vh[0]
        expected = x[b].flatten() - (a[0] @ v1) * v1
        assert torch.allclose(out[b].flatten(), expected, atol=1e-10)


def test_tcfg_identities():
    x, u = _t(0), _t(2)
    g_u = x - u
    # Parallel directions: the uncond is kept.
    assert torch.allclose(tcfg_uncond(x, x - 2.5 * g_u, u), u, atol=1e-10)
    # Orthogonal, cond larger: the uncond direction vanishes (D_u' = x); uncond larger: kept.
    flat = g_u.flatten(1)
    other = _t(5).flatten(1)
    other = other - ((other * flat).sum(1, keepdim=True) / (flat * flat).sum(1, keepdim=True)) * flat
    big = other / other.norm(dim=1, keepdim=True) * flat.norm(dim=1, keepdim=True) * 3
    small = big / 9
    assert torch.allclose(tcfg_uncond(x, x - big.reshape(x.shape), u), x, atol=1e-9)
    assert torch.allclose(tcfg_uncond(x, x - small.reshape(x.shape), u), u, atol=1e-9)
    assert tcfg_uncond(x.float(), x.float(), x.float()).dtype == torch.float32


# --- MaHiRo ----------------------------------------------------------------------------------


def test_mahiro_matches_the_reference_formula_by_hand():
    c, u = _t(1), _t(2)
    w = 6.0
    d = _cfg(c, u, w)
    leap, u_leap = w * c, w * u
    merge = (leap + d) / 2

    def sroot(t):
        return torch.sign(t) * t.abs().sqrt()

    a, b = sroot(u_leap), sroot(merge)
    cos = (a * b).sum(1) / torch.clamp(a.norm(dim=1) * b.norm(dim=1), min=1e-8)
    k = 2 * (cos.mean() + 1)
    assert torch.allclose(mahiro(d, c, u, w), (k * d + (4 - k) * leap) / 4, atol=1e-10)


def test_mahiro_identities():
    c, u = _t(1), _t(2)
    assert torch.allclose(mahiro(c, c, u, 1.0), c, atol=1e-12)  # CFG 1: D = D_c
    assert torch.allclose(mahiro(_cfg(c, c, 5.0), c, c, 5.0), c, atol=1e-10)  # D_u = D_c: sim = 1


# --- Skimmed CFG -----------------------------------------------------------------------------


def _sgn(v):
    return (v > 0) - (v < 0)


def _mask(x, a, b, s, flip=True):
    d = b + s * (a - b)
    ok = _sgn(a - b) == _sgn(a) and _sgn(a) == _sgn(a * s - b * (s - 1))
    return ok and (not flip or _sgn(d) == _sgn(d - x))


def _skim_by_hand(x, c, u, w, k, mode, full_negative=False, flip=True):
    """Element by element with Python floats, in the reference's order of updates."""
    out = torch.empty_like(c)
    for i, (xe, ce, ue) in enumerate(zip(x.flatten().tolist(), c.flatten().tolist(), u.flatten().tolist())):
        if mode == "skim":
            ku = 0.0 if full_negative else k
            if _mask(xe, ue, ce, w, flip):
                ue = ue - (w - ku) / w * (ue - ce)
            if _mask(xe, ce, ue, w, flip):
                ce = ce - (w - k) / w * (ce - ue)
        else:
            f = (k - 1) / (w - 1)
            if _mask(xe, ce, ue, w):
                ue = ce * (1 - f) + ue * f
            if _mask(xe, ue, ce, w):
                ue = ce * (1 - f) + ue * f
        out.view(-1)[i] = ue + w * (ce - ue)
    return out


@pytest.mark.parametrize("mode,full,flip", [("skim", False, True), ("skim", True, False), ("linear", False, True)])
def test_skimmed_matches_an_elementwise_rederivation(mode, full, flip):
    x, c, u = _t(0) * 2, _t(1), _t(2)
    out = skimmed_combine(x, c, u, 9.0, 4.0, mode=mode, full_skim_negative=full, flipping_filter=flip)
    expected = _skim_by_hand(x, c, u, 9.0, 4.0, mode, full, flip)
    assert torch.allclose(out, expected, atol=1e-12)
    assert not torch.allclose(out, _cfg(c, u, 9.0))  # the masks are not empty on random data


def test_skimmed_identities():
    x, c, u = _t(0), _t(1), _t(2)
    assert torch.allclose(skimmed_combine(x, c, u, 7.0, 7.0, mode="linear"), _cfg(c, u, 7.0), atol=1e-12)
    ones = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for mode in ("skim", "linear"):
        assert torch.equal(skimmed_combine(100 * ones, ones, 2 * ones, 8.0, 3.0, mode=mode), _cfg(ones, 2 * ones, 8.0))
        assert skimmed_predictions(x, c, u, 1.0, 3.0, mode=mode) == (c, u)  # CFG 1: left alone


# --- NAG -------------------------------------------------------------------------------------


def test_nag_identities():
    zp, zn = _t(1, (2, 16, 8)), _t(2, (2, 16, 8))
    assert torch.allclose(nag_attention(zp, zn, 1.0, 2.5, 0.5), zp)
    assert torch.allclose(nag_attention(zp, zn, 5.0, 2.5, 0.0), zp)
    assert torch.allclose(nag_attention(zp, zn, 5.0, 1e9, 1.0), 5 * zp - 4 * zn)
    assert torch.allclose(nag_attention(zp, zp, 5.0, 2.5, 1.0), zp)
    out = nag_attention(zp, zn, 8.0, 2.5, 1.0)
    ratio = out.abs().sum(-1) / zp.abs().sum(-1)
    assert float(ratio.max()) <= 2.5 + 1e-9 and float(ratio.max()) > 2.0  # the clip binds
    zero = torch.zeros_like(zp)
    assert torch.equal(nag_attention(zero, zn, 5.0, 2.5, 0.25), zero)  # all-zero cond: no NaN


def test_nag_matches_a_per_token_rederivation():
    zp, zn = _t(1, (1, 5, 6)), _t(2, (1, 5, 6))
    phi, tau, alpha = 4.0, 1.7, 0.6
    out = nag_attention(zp, zn, phi, tau, alpha)
    for n in range(5):
        p, m = zp[0, n], zn[0, n]
        z = phi * p - (phi - 1) * m
        r = z.abs().sum() / p.abs().sum()
        expected = alpha * z * min(r, tau) / r + (1 - alpha) * p
        assert torch.allclose(out[0, n], expected, atol=1e-12)


def test_multihead_attention_is_the_modules_attention_before_to_out():
    from lib_merge.testing.unet import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=2, dim_head=8)
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    z = multihead_attention(attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx), attn.heads)
    assert torch.allclose(attn.to_out(z), attn(x, ctx), atol=1e-6)


# --- FDG -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (2, 3)])
def test_fdg_identities(hw):
    c, u = _t(1, (2, 4) + hw), _t(2, (2, 4) + hw)
    assert torch.allclose(fdg_combine(c, u, 6.0, 6.0), _cfg(c, u, 6.0), atol=1e-12)
    flat_c = u + torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1)  # spatially constant Δ
    assert torch.allclose(fdg_combine(flat_c, u, 3.0, 12.0), _cfg(flat_c, u, 3.0), atol=1e-12)
    assert low_pass(c).shape == c.shape


def test_fdg_equals_the_two_level_pyramid_recombined():
    c, u = _t(1, (1, 4, 8, 6)), _t(2, (1, 4, 8, 6))
    w_low, w_high = 4.0, 11.0

    def down(y):  # blur (5-tap binomial, reflect) and keep every other pixel
        k = torch.tensor([1.0, 4, 6, 4, 1], dtype=y.dtype) / 16
        k2 = (k[:, None] * k[None, :]).expand(y.shape[1], 1, 5, 5)
        return F.conv2d(F.pad(y, (2, 2, 2, 2), mode="reflect"), k2, groups=y.shape[1])[..., ::2, ::2]

    def up(z, hw):
        k = torch.tensor([1.0, 4, 6, 4, 1], dtype=z.dtype) / 16
        k2 = (k[:, None] * k[None, :]).expand(z.shape[1], 1, 5, 5)
        y = torch.zeros(z.shape[:2] + hw, dtype=z.dtype)
        y[..., ::2, ::2] = z
        return 4 * F.conv2d(F.pad(y, (2, 2, 2, 2), mode="reflect"), k2, groups=z.shape[1])

    hw = c.shape[-2:]
    low_c, low_u = down(c), down(u)
    high_c, high_u = c - up(low_c, hw), u - up(low_u, hw)
    g_low = low_c + (w_low - 1) * (low_c - low_u)
    g_high = high_c + (w_high - 1) * (high_c - high_u)
    assert torch.allclose(fdg_combine(c, u, w_low, w_high), up(g_low, hw) + g_high, atol=1e-10)
    assert torch.allclose(high_pass(c), high_c, atol=1e-12)


# --- CFG interval ----------------------------------------------------------------------------


def test_sigma_interval_is_half_open():
    interval = SigmaInterval(0.28, 5.42)
    assert interval.contains(5.42) and not interval.contains(0.28) and interval.contains(1.0)
    assert not interval.contains(torch.tensor([14.6, 14.6])) and interval.scale(7.0, 9.0) == 1.0
    assert SigmaInterval(0.0, math.inf).contains(1e6)
    with pytest.raises(BadParameterError, match="below"):
        SigmaInterval(3.0, 1.0)
