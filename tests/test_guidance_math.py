import math

import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.guidance import (
    backbone_scale,
    blur_queries,
    cfg_combine,
    cfg_rescale,
    feature_hw,
    fourier_filter,
    freeu_patch,
    gaussian_kernel_size,
    identity_attention,
    saliency,
    sanf_fuse,
    seg_blur_2d,
)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# --- CFG -------------------------------------------------------------------------------------


def test_cfg_scale_one_gives_cond():
    c, u = torch.randn(2, 4, 8, 8, generator=_g(1)), torch.randn(2, 4, 8, 8, generator=_g(2))
    assert torch.allclose(cfg_combine(c, u, 1.0), c, atol=1e-6)
    assert torch.allclose(cfg_combine(c, u, 7.5), u + 7.5 * (c - u))


def test_cfg_and_subprompts_follow_a1111_combine_denoised():
    # 2 images, image 0 has sub-prompts in rows 0 and 1, image 1 in rows 2 and 3.
    cond = torch.randn(4, 4, 4, 4, generator=_g(3))
    uncond = torch.randn(2, 4, 4, 4, generator=_g(4))
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 0.8), (3, 1.2)]]
    w = 6.0
    expected = uncond.clone()
    for i, subprompts in enumerate(conds_list):
        for row, weight in subprompts:
            expected[i] += weight * w * (cond[row] - uncond[i])
    assert torch.allclose(cfg_combine(cond, uncond, w, conds_list), expected, atol=1e-5)


def test_cfg_rejects_inconsistent_rows():
    with pytest.raises(BadParameterError):
        cfg_combine(torch.zeros(3, 1, 2, 2), torch.zeros(2, 1, 2, 2), 7.0)
    with pytest.raises(BadParameterError):
        cfg_combine(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), 7.0, [[(0, 1.0)], [(5, 1.0)]])


# --- CFG rescale -----------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["v", "eps", "x0"])
def test_rescale_phi_zero_is_plain_cfg(space):
    x = torch.randn(2, 4, 8, 8, generator=_g(5))
    guided, cond = torch.randn(2, 4, 8, 8, generator=_g(6)), torch.randn(2, 4, 8, 8, generator=_g(7))
    out = cfg_rescale(guided, cond, 0.0, x=x, sigma=torch.tensor([3.0, 0.5]), space=space)
    assert torch.equal(out, guided)


@pytest.mark.parametrize("space", ["v", "eps", "x0"])
def test_rescale_phi_one_matches_cond_std_in_its_space(space):
    x = torch.randn(2, 4, 8, 8, generator=_g(8))
    sigma = torch.tensor([5.0, 0.3])
    cond = torch.randn(2, 4, 8, 8, generator=_g(9))
    guided = cond + 4.0 * torch.randn(2, 4, 8, 8, generator=_g(10))
    out = cfg_rescale(guided, cond, 1.0, x=x, sigma=sigma, space=space)
    offset = {"x0": 0.0, "eps": x, "v": x / (sigma**2 + 1)[:, None, None, None]}[space]
    std = lambda t: (offset - t).flatten(1).std(dim=1)
    assert torch.allclose(std(out), std(cond), rtol=1e-5)


def test_rescale_v_space_equals_the_explicit_v_prediction_form():
    x = torch.randn(1, 4, 8, 8, generator=_g(11))
    sigma = torch.tensor([2.0])
    cond, guided = torch.randn(1, 4, 8, 8, generator=_g(12)), torch.randn(1, 4, 8, 8, generator=_g(13))
    s = sigma[:, None, None, None]
    to_v = lambda d: (x / (s**2 + 1) - d) * (s**2 + 1).sqrt() / s
    v_c, v_g = to_v(cond), to_v(guided)
    v = 0.7 * v_g * (v_c.std() / v_g.std()) + 0.3 * v_g
    expected = x / (s**2 + 1) - v * s / (s**2 + 1).sqrt()
    assert torch.allclose(cfg_rescale(guided, cond, 0.7, x=x, sigma=sigma), expected, atol=1e-5)


def test_rescale_needs_x_and_sigma_outside_x0_space():
    with pytest.raises(BadParameterError):
        cfg_rescale(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), 0.5)


# --- SEG -------------------------------------------------------------------------------------


def test_kernel_size_rule():
    # SEG-SDXL: k = ceil(6σ) + 1 − ceil(6σ) mod 2, i.e. ceil(6σ) itself when that is odd.
    assert gaussian_kernel_size(1.0, 64) == 7
    assert [gaussian_kernel_size(s, 64) for s in (0.5, 1.5, 2.5)] == [3, 9, 15]
    assert gaussian_kernel_size(100.0, 8) == 9  # the reference's clamp: an even map takes extent + 1
    assert gaussian_kernel_size(100.0, 9) == 9
    assert gaussian_kernel_size(3.0, 2) == 3
    assert gaussian_kernel_size(3.0, 1) == 1


def _dense_reference_blur(x, sigma, size):
    """Gaussian blur written out pixel by pixel: 2-D kernel k[a]·k[b] at integer offsets, edges
    mirrored without repeating the edge pixel (reflect), independent of F.pad / conv2d."""
    r = size // 2
    k = [math.exp(-0.5 * (a / sigma) ** 2) for a in range(-r, r + 1)]
    k = [w / sum(k) for w in k]
    xd = x.double()
    h, w = x.shape[-2:]

    def mirror(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = torch.zeros_like(xd)
    for i in range(h):
        for j in range(w):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    out[..., i, j] += k[a + r] * k[b + r] * xd[..., mirror(i + a, h), mirror(j + b, w)]
    return out


@pytest.mark.parametrize("sigma, size", [(0.5, 3), (1.5, 9), (2.5, 15)])
def test_seg_blurred_queries_match_a_dense_computation_with_the_official_kernel(sigma, size):
    hw = (20, 18)  # wide enough that no clamp applies
    q = torch.randn(2, hw[0] * hw[1], 3, generator=_g(40))
    out = blur_queries(q, hw, sigma)
    grid = q.transpose(1, 2).reshape(2, 3, *hw)
    expected = _dense_reference_blur(grid, sigma, size).reshape(2, 3, -1).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_seg_infinite_sigma_is_the_spatial_mean():
    q = torch.randn(2, 12 * 8, 16, generator=_g(14))
    out = blur_queries(q, (12, 8), math.inf)
    assert torch.allclose(out, q.mean(dim=1, keepdim=True).expand_as(q), atol=1e-6)


def test_seg_tiny_sigma_is_identity_and_finite_sigma_is_not_the_mean():
    x = torch.randn(1, 3, 10, 6, generator=_g(15))
    assert torch.allclose(seg_blur_2d(x, 0.01), x, atol=1e-6)
    blurred = seg_blur_2d(x, 2.0)
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    assert not torch.allclose(blurred, mean, atol=1e-3)
    assert not torch.allclose(blurred, x, atol=1e-3)
    # A blur keeps the mean of a constant map and shrinks variation.
    assert blurred.std() < x.std()
    const = torch.full((1, 2, 5, 7), 3.0)
    assert torch.allclose(seg_blur_2d(const, 1.5), const)


def test_seg_blur_is_separable_gaussian_with_reflect_padding():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    out = seg_blur_2d(x, 1.0)
    k = torch.exp(-0.5 * torch.arange(-3, 4, dtype=torch.float64) ** 2)
    k = (k / k.sum()).float()
    assert torch.allclose(out[0, 0, 1:8, 1:8], torch.outer(k, k), atol=1e-6)
    # Reflect padding mirrors row 1 to padded row -1, so output row 0 sees that spike twice.
    edge = torch.zeros(1, 1, 9, 9)
    edge[0, 0, 1, 4] = 1.0
    blurred = seg_blur_2d(edge, 1.0)
    assert float(blurred[0, 0, 0, 4]) == pytest.approx(2 * float(k[4]) * float(k[3]), rel=1e-5)


def test_seg_blur_uses_the_real_grid_not_a_square():
    # On the true 4x8 grid each row is constant, so the blur keeps rows constant and mixes rows only.
    rows = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 8)
    q = rows.reshape(1, 32, 1).expand(1, 32, 3).contiguous()
    out = blur_queries(q, (4, 8), 0.8).reshape(1, 4, 8, 3)
    assert torch.allclose(out, out[:, :, :1, :].expand_as(out), atol=1e-6)
    assert out[0, 0, 0, 0] > 0.0
    # Read as an 8x4 grid the same tokens would not stay row-constant.
    wrong = blur_queries(q, (8, 4), 0.8).reshape(1, 4, 8, 3)
    assert not torch.allclose(wrong, wrong[:, :, :1, :].expand_as(wrong), atol=1e-3)


@pytest.mark.parametrize(
    "latent, seq, expected",
    [((64, 64), 64 * 64, (64, 64)), ((96, 64), 12 * 8, (12, 8)), ((25, 17), 13 * 9, (13, 9)), ((20, 12), 15, (5, 3)),
     ((128, 96), 32 * 24, (32, 24))],
)
def test_feature_hw_follows_the_latent_aspect_ratio(latent, seq, expected):
    assert feature_hw(latent, seq) == expected


def test_feature_hw_falls_back_to_nearest_aspect_factorisation():
    assert feature_hw((30, 60), 50) == (5, 10)


# --- PAG -------------------------------------------------------------------------------------


def test_identity_attention_returns_v_truncated_to_the_queries():
    q, v = torch.randn(2, 6, 8), torch.randn(2, 10, 8)
    assert torch.equal(identity_attention(q, v, v), v[:, :6])


# --- SANF ------------------------------------------------------------------------------------


def test_saliency_is_a_spatial_softmax_per_image_and_channel():
    s = saliency(torch.randn(2, 3, 5, 4, generator=_g(16)))
    assert torch.allclose(s.sum(dim=(2, 3)), torch.ones(2, 3))


def _blur3_by_hand(term):
    """|g| blurred with the 3x3 σ = 1 Gaussian (reflect edges), written out in float64."""
    k = [math.exp(-0.5), 1.0, math.exp(-0.5)]
    k = [w / sum(k) for w in k]
    g = term.abs().double()
    b, c, h, w = g.shape

    def mirror(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    blurred = torch.zeros_like(g)
    for i in range(h):
        for j in range(w):
            for a in (-1, 0, 1):
                for d in (-1, 0, 1):
                    blurred[..., i, j] += k[a + 1] * k[d + 1] * g[..., mirror(i + a, h), mirror(j + d, w)]
    return blurred


def test_saliency_and_fusion_match_a_hand_computation_over_h_w():
    a = torch.randn(2, 4, 5, 6, generator=_g(41)) * 2
    b = torch.randn(2, 4, 5, 6, generator=_g(42)) * 2
    # Face-diffuser's axis: exp / Σexp over the H·W positions of each (image, channel).
    by_position = lambda t: _blur3_by_hand(t).exp() / _blur3_by_hand(t).exp().sum(dim=(2, 3), keepdim=True)
    sa, sb = by_position(a), by_position(b)
    torch.testing.assert_close(saliency(a).double(), sa, atol=1e-6, rtol=1e-5)
    expected = torch.where(sa >= sb, a, b)
    assert torch.equal(sanf_fuse([a, b]), expected)
    # incantations' axis (softmax across the 4 latent channels) picks differently on these terms.
    by_channel = lambda t: torch.softmax(_blur3_by_hand(t), dim=1)
    assert not torch.equal(torch.where(by_channel(a) >= by_channel(b), a, b), expected)


def test_sanf_picks_the_more_salient_term_per_element():
    a = torch.zeros(1, 1, 6, 6)
    b = torch.zeros(1, 1, 6, 6)
    a[..., :3] = 5.0  # a dominates the left half, b the right half
    b[..., 3:] = 5.0
    a[..., 3:] = 0.1
    b[..., :3] = 0.1
    fused = sanf_fuse([a, b])
    assert torch.equal(fused[..., :2], a[..., :2])
    assert torch.equal(fused[..., 4:], b[..., 4:])
    assert torch.equal(sanf_fuse([a, a]), a)


# --- FreeU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_freeu_identity_at_b_s_one(version):
    h, hsp = torch.randn(2, 128, 6, 4), torch.randn(2, 128, 6, 4)
    h2, hsp2 = freeu_patch(h, hsp, model_channels=32, b1=1.0, b2=1.0, s1=1.0, s2=1.0, version=version)
    assert torch.equal(h2, h) and torch.equal(hsp2, hsp)


def test_freeu_picks_stage_by_backbone_channels():
    h4, h2, h1 = torch.ones(1, 128, 4, 4), torch.ones(1, 64, 4, 4), torch.ones(1, 32, 4, 4)
    kw = {"model_channels": 32, "b1": 1.5, "b2": 2.0, "s1": 1.0, "s2": 1.0, "version": 1}
    assert freeu_patch(h4, h4, **kw)[0][:, :64].unique().tolist() == [1.5]
    assert freeu_patch(h2, h2, **kw)[0][:, :32].unique().tolist() == [2.0]
    assert torch.equal(freeu_patch(h1, h1, **kw)[0], h1)
    # The second half of the channels is never scaled.
    assert freeu_patch(h4, h4, **kw)[0][:, 64:].unique().tolist() == [1.0]


def test_freeu_v2_scales_by_normalised_channel_mean():
    h = torch.zeros(1, 4, 1, 3)
    h[0, :, 0, :] = torch.tensor([0.0, 1.0, 2.0])  # channel mean 0, 1, 2 -> alpha 0, 0.5, 1
    out = backbone_scale(h, 3.0, version=2)
    assert torch.allclose(out[0, :2, 0], torch.tensor([[0.0, 2.0, 6.0]] * 2))
    assert torch.equal(out[0, 2:], h[0, 2:])
    flat = torch.ones(1, 4, 2, 2)
    assert torch.equal(backbone_scale(flat, 3.0, version=2), flat)  # no NaN on a constant map


def test_fourier_filter_scales_only_the_lowest_frequencies():
    x = torch.randn(1, 2, 8, 6, generator=_g(17))
    assert torch.allclose(fourier_filter(x, 1, 1.0), x, atol=1e-5)
    # The DC component sits inside the box: scaling by 0 removes the mean.
    out = fourier_filter(x, 1, 0.0)
    assert out.mean(dim=(2, 3)).abs().max() < 1e-5
    assert out.dtype == x.dtype
    assert fourier_filter(x.half(), 1, 0.5).dtype == torch.float16


@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (16, 6), (1, 4), (2, 2)])
@pytest.mark.parametrize("threshold", [1, 2])
def test_fourier_filter_equals_the_full_spectrum_reference(hw, threshold):
    # The FreeU reference: centre the full FFT, scale a box, undo, keep the real part.
    x = torch.randn(2, 3, *hw, generator=_g(18), dtype=torch.float64).float()
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    h, w = hw
    mask = torch.ones(h, w)
    mask[max(h // 2 - threshold, 0) : h // 2 + threshold, max(w // 2 - threshold, 0) : w // 2 + threshold] = 0.3
    expected = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    assert torch.allclose(fourier_filter(x, threshold, 0.3), expected, atol=1e-5)
