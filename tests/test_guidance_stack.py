import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.guidance import (
    RESCALE_SPACE,
    GuidanceSettings,
    GuidanceStack,
    GuidedDenoiser,
    cfg_rescale,
    dynamic_threshold,
    sanf_fuse,
)
from lib_merge.guidance.dynthres import DynThresholdConfig
from lib_merge.testing import EpsDenoiser, make_tiny_unet, random_conditioning

SHAPE = (2, 4, 6, 6)


def _t(seed, shape=SHAPE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _stack(cfg_scale=7.0, steps=10, **settings):
    return GuidanceStack(GuidanceSettings(**settings), steps, cfg_scale=cfg_scale)


# --- plans -----------------------------------------------------------------------------------


def test_default_settings_plan_plain_cfg_and_are_trivial():
    plan = _stack().plan(0)
    assert plan.roles == ("cond", "uncond") and plan.is_trivial and plan.cfg_scale == 7.0


def test_cfg_one_drops_the_uncond():
    plan = _stack(cfg_scale=1.0).plan(0)
    assert plan.roles == ("cond",) and plan.is_trivial


def test_uncond_kept_at_cfg_one_when_something_reads_it():
    assert _stack(cfg_scale=1.0, cfgpp=0.5).plan(0).roles == ("cond", "uncond")
    assert _stack(cfg_scale=1.0, dynthres_enabled=True).plan(0).roles == ("cond", "uncond")
    assert _stack(cfg_scale=1.0).plan(0, force_uncond=True).roles == ("cond", "uncond")


def test_same_cond_drops_the_uncond_whatever_reads_it():
    s = GuidanceSettings(untitled="zero", pag_scale=3.0, cfgpp=0.5, dynthres_enabled=True)
    plan = GuidanceStack(s, 10, cfg_scale=7.0, untitled_same_cond=True).plan(0)
    assert plan.roles == ("cond", "pag")


def test_untitled_plus_pag_is_two_rows_per_image():
    s = GuidanceSettings(untitled="empty", pag_scale=3.0)
    plan = GuidanceStack(s, 10, cfg_scale=1.0, untitled_same_cond=True).plan(0)
    assert plan.roles == ("cond", "pag") and plan.batch_size(1, 1) == 2 and not plan.is_trivial


def test_role_order_and_window_gating():
    stack = _stack(pag_scale=3.0, pag_start=2, pag_end=3, seg_scale=2.0, seg_start=0.5, seg_end=1.0)
    roles = [stack.plan(i).roles for i in range(10)]
    assert roles[0] == ("cond", "uncond")
    assert roles[2] == ("cond", "uncond", "pag")
    assert roles[5] == ("cond", "uncond", "seg")  # 5/9 >= 0.5
    assert roles[4] == ("cond", "uncond")
    assert stack.plan(2).pag_scale == 3.0 and stack.plan(4).pag_scale == 0.0


def test_rows_with_and_prompts_and_batch_three():
    # Batch 3, two AND sub-prompts each: 6 cond rows, 3 uncond rows, pag and seg copy the cond rows.
    plan = _stack(pag_scale=3.0, seg_scale=2.0).plan(0)
    rows = plan.rows(6, 3)
    assert rows == {"cond": slice(0, 6), "uncond": slice(6, 9), "pag": slice(9, 15), "seg": slice(15, 21)}
    assert plan.batch_size(6, 3) == 21
    no_uncond = GuidanceStack(GuidanceSettings(seg_scale=2.0), 10, cfg_scale=1.0).plan(0)
    assert no_uncond.rows(6, 3) == {"cond": slice(0, 6), "seg": slice(6, 12)}


def test_hires_toggles():
    s = GuidanceSettings(pag_scale=3.0, pag_hires=False, rescale_phi=0.7, rescale_hires=False, cfgpp=0.5, cfgpp_hires=False)
    plan = GuidanceStack(s, 10, hires=True, cfg_scale=5.0).plan(0)
    assert plan.roles == ("cond", "uncond") and plan.rescale_phi == 0 and not plan.cfgpp and plan.cfg_scale == 5.0
    assert plan.is_trivial


def test_freeu_window():
    stack = _stack(freeu_enabled=True, freeu_start=0.0, freeu_end=0.5)
    assert [stack.freeu_active(i) for i in (0, 4, 5, 9)] == [True, True, False, False]
    assert stack.plan(0).freeu and not stack.plan(9).freeu


def test_dynthres_schedule_reaches_the_plan():
    stack = _stack(cfg_scale=9.0, steps=11, dynthres_enabled=True, dynthres_cfg_mode="Linear Down", dynthres_cfg_scale_min=1.0)
    assert stack.plan(5).cfg_scale == pytest.approx(5.0) and stack.plan(5).mimic_scale == pytest.approx(7.0)


def test_bad_total_steps():
    with pytest.raises(BadParameterError):
        _stack(steps=0)


# --- combine ---------------------------------------------------------------------------------


def _combine(stack, step=0, **kw):
    plan = stack.plan(step)
    x = kw.pop("x", _t(99))
    return stack.combine(plan, step, x=x, sigma=torch.tensor([2.0, 0.5]), **kw)


def test_combine_cfg_one_is_cond_and_skipped_uncond_is_cond():
    c, u = _t(1), _t(2)
    assert torch.allclose(_combine(_stack(cfg_scale=1.0), d_cond=c, d_uncond=u), c, atol=1e-6)
    assert torch.equal(_combine(_stack(cfg_scale=7.0), d_cond=c, d_uncond=None), c)


def test_combine_stacks_cfg_pag_and_seg():
    c, u, p, s = _t(1), _t(2), _t(3), _t(4)
    out = _combine(_stack(cfg_scale=5.0, pag_scale=3.0, seg_scale=2.0), d_cond=c, d_uncond=u, d_pag=p, d_seg=s)
    assert torch.allclose(out, u + 5 * (c - u) + 3 * (c - p) + 2 * (c - s), atol=1e-5)


def test_combine_with_and_prompts_weights_every_term_per_subprompt():
    c, u, p = _t(1, (4, 4, 3, 3)), _t(2, (2, 4, 3, 3)), _t(3, (4, 4, 3, 3))
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 1.0), (3, 1.0)]]
    out = _combine(
        _stack(cfg_scale=4.0, pag_scale=2.0), d_cond=c, d_uncond=u, d_pag=p, conds_list=conds_list, x=_t(9, (2, 4, 3, 3))
    )
    expected = u.clone()
    for i, subprompts in enumerate(conds_list):
        for row, weight in subprompts:
            expected[i] += weight * (4.0 * (c[row] - u[i]) + 2.0 * (c[row] - p[row]))
    assert torch.allclose(out, expected, atol=1e-5)


def test_skipped_uncond_with_and_prompts_uses_the_weighted_mean():
    c = _t(1, (4, 4, 3, 3))
    conds_list = [[(0, 1.0), (1, 3.0)], [(2, 1.0), (3, 1.0)]]
    out = _combine(_stack(cfg_scale=1.0), d_cond=c, d_uncond=None, conds_list=conds_list, x=_t(9, (2, 4, 3, 3)))
    assert torch.allclose(out[0], (c[0] + 3 * c[1]) / 4, atol=1e-6)
    assert torch.allclose(out[1], (c[2] + c[3]) / 2, atol=1e-6)


def test_combine_requires_the_passes_the_plan_runs():
    with pytest.raises(BadParameterError, match="d_pag"):
        _combine(_stack(pag_scale=3.0), d_cond=_t(1), d_uncond=_t(2))
    stack = _stack()
    with pytest.raises(BadParameterError, match="step"):
        stack.combine(stack.plan(0), 1, x=_t(9), sigma=torch.ones(2), d_cond=_t(1), d_uncond=_t(2))


def test_rescale_in_the_stack_targets_the_effective_cond_in_v_space():
    c, u, p = _t(1), _t(2), _t(3)
    x, sigma = _t(9), torch.tensor([2.0, 0.5])
    stack = _stack(cfg_scale=6.0, pag_scale=2.0, rescale_phi=0.7)
    plan = stack.plan(0)
    out = stack.combine(plan, 0, x=x, sigma=sigma, d_cond=c, d_uncond=u, d_pag=p)
    guided = u + 6 * (c - u) + 2 * (c - p)
    assert RESCALE_SPACE == "v" and stack.rescale_space == "v"
    assert torch.allclose(out, cfg_rescale(guided, c, 0.7, x=x, sigma=sigma, space="v"), atol=1e-5)
    phi0 = _stack(cfg_scale=6.0, pag_scale=2.0, rescale_phi=0.0)
    assert torch.allclose(_combine(phi0, d_cond=c, d_uncond=u, d_pag=p, x=x), guided, atol=1e-5)


def test_dynthres_in_the_stack_uses_the_mimic_target():
    c, u = _t(1), _t(2)
    stack = _stack(cfg_scale=12.0, dynthres_enabled=True, dynthres_mimic_scale=3.0)
    out = _combine(stack, d_cond=c, d_uncond=u)
    expected = dynamic_threshold(u + 12 * (c - u), u + 3 * (c - u), DynThresholdConfig(mimic_scale=3.0))
    assert torch.allclose(out, expected, atol=1e-5)


def test_sanf_fuses_cfg_and_pag_terms_only_with_a_real_uncond():
    c, u, p, s = _t(1), _t(2), _t(3), _t(4)
    stack = _stack(cfg_scale=5.0, pag_scale=3.0, pag_sanf=True, seg_scale=1.0)
    out = _combine(stack, d_cond=c, d_uncond=u, d_pag=p, d_seg=s)
    assert torch.allclose(out, u + sanf_fuse([5 * (c - u), 3 * (c - p)]) + (c - s), atol=1e-5)
    skipped = _combine(stack, d_cond=c, d_uncond=None, d_pag=p, d_seg=s)
    assert torch.allclose(skipped, c + 3 * (c - p) + (c - s), atol=1e-5)


def test_cfgpp_uses_lambda_and_records_the_uncond():
    c, u = _t(1), _t(2)
    stack = _stack(cfg_scale=7.0, cfgpp=0.4)
    out = _combine(stack, d_cond=c, d_uncond=u)
    assert torch.allclose(out, u + 0.4 * (c - u), atol=1e-6)
    assert torch.equal(stack.cfgpp_state.uncond, u)


def test_half_precision_predictions_stay_half():
    out = _combine(_stack(rescale_phi=0.5), d_cond=_t(1).half(), d_uncond=_t(2).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --- the reference denoiser: one batched forward per step -----------------------------------


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_guided_denoiser_batched_equals_unbatched_with_and_prompts(flavour):
    unet = make_tiny_unet(flavour)
    cond = random_conditioning(unet.config, 4, seed=1)  # 2 images x 2 sub-prompts
    uncond = random_conditioning(unet.config, 2, seed=2)
    conds_list = [[(0, 1.0), (1, 0.7)], [(2, 1.0), (3, 1.0)]]
    settings = GuidanceSettings(pag_scale=2.0, seg_scale=1.5, seg_sigma=2.0, pag_layers="all", freeu_enabled=True)
    x = _t(5, (2, 4, 16, 8))
    sigma = torch.tensor([3.0, 3.0])
    outs, rows = [], []
    for batched in (True, False):
        stack = GuidanceStack(settings, 10, cfg_scale=5.0)
        with GuidedDenoiser(EpsDenoiser(unet), stack, diffusion_model=unet, cond=cond, uncond=uncond,
                            conds_list=conds_list, batched=batched) as denoiser, torch.no_grad():
            outs.append(denoiser(x, sigma))
            rows.append((denoiser.rows_per_step[0], denoiser.forwards_per_step[0]))
    assert rows == [(14, 1), (14, 4)]
    # Guidance scales amplify float32 batching differences of the U-Net (about 1e-5) roughly tenfold.
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=5e-4)


# --- who reads the uncond (issue 9, item 7) --------------------------------------------------


def test_a_host_sampler_reading_the_uncond_keeps_it_at_cfg_one():
    # A1111's DDIM CFG++ at CFG 12.5 makes w = 12.5 × 1/12.5 = 1 and renoises with last_noise_uncond.
    stack = GuidanceStack(GuidanceSettings(pag_scale=3), 20, cfg_scale=1.0)
    assert stack.plan(0).roles == ("cond", "pag")
    assert stack.plan(0, host_reads_uncond=True).roles == ("cond", "uncond", "pag")
    # With c ≡ u the cond rows are the uncond rows: skipped where the adapter hands them to the host
    # (A1111), run where the host would otherwise read nothing (Forge).
    same = GuidanceSettings(untitled="zero", pag_scale=3)
    a1111_like = GuidanceStack(same, 20, cfg_scale=1.0, untitled_same_cond=True)
    forge_like = GuidanceStack(same, 20, cfg_scale=1.0, untitled_same_cond=True, cond_stands_in_for_uncond=False)
    assert a1111_like.plan(0, host_reads_uncond=True).roles == ("cond", "pag")
    assert forge_like.plan(0, host_reads_uncond=True).roles == ("cond", "uncond", "pag")
    assert forge_like.plan(0).roles == ("cond", "pag")


def test_sanf_at_cfg_one_reads_the_uncond_only_inside_the_pag_window():
    stack = _stack(cfg_scale=1.0, pag_scale=3.0, pag_sanf=True, pag_start=2, pag_end=3)
    assert stack.plan(2).roles == ("cond", "uncond", "pag") and stack.plan(2).sanf
    assert stack.plan(5).roles == ("cond",) and not stack.plan(5).sanf
    c, p = _t(1), _t(3)
    # Untitled c ≡ u: the skipped D_u is D_c exactly, so SANF still fuses (its CFG term is 0 there).
    same = GuidanceStack(GuidanceSettings(pag_scale=3.0, pag_sanf=True), 10, cfg_scale=1.0, untitled_same_cond=True)
    plan = same.plan(0)
    assert plan.roles == ("cond", "pag")
    out = same.combine(plan, 0, x=_t(9), sigma=torch.ones(2), d_cond=c, d_uncond=None, d_pag=p)
    assert torch.allclose(out, c + sanf_fuse([torch.zeros_like(c), 3 * (c - p)]), atol=1e-6)


def test_sanf_at_cfg_one_with_a_prompt_equals_the_fusion_with_the_real_uncond():
    unet = make_tiny_unet("sd1")
    cond, uncond = random_conditioning(unet.config, 2, seed=1), random_conditioning(unet.config, 2, seed=2)
    x, sigma = _t(5, (2, 4, 8, 8)) * 3.0, torch.full((2,), 3.0)
    eps = EpsDenoiser(unet)

    def run(settings, cfg_scale, same_cond=False):
        stack = GuidanceStack(settings, 10, cfg_scale=cfg_scale, untitled_same_cond=same_cond)
        with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=cond, uncond=uncond) as den, torch.no_grad():
            return den(x, sigma), den.rows_per_step[0]

    with torch.no_grad():
        d_c, d_u = eps(x, sigma, cond=cond), eps(x, sigma, cond=uncond)
    pag_only, _ = run(GuidanceSettings(pag_scale=1.0), 1.0)
    d_pag = 2 * d_c - pag_only  # D = D_c + 1·(D_c − D_pag)
    fused, rows = run(GuidanceSettings(pag_scale=3.0, pag_sanf=True), 1.0)
    assert rows == 6  # c, u, c_pag for 2 images
    expected = d_u + sanf_fuse([d_c - d_u, 3 * (d_c - d_pag)])
    assert torch.allclose(fused, expected, atol=1e-4)
    # Without the uncond the fusion silently became plain addition: the two differ clearly.
    assert (fused - (d_c + 3 * (d_c - d_pag))).abs().max() > 0.1


# --- CFG++ with dynamic thresholding (issue 9, item 6) ---------------------------------------


def _cfgpp_dynthres(measure, start, sigma, sigma_next, lam=0.6, mimic=7.0, **extra):
    c, u = _t(1, (2, 4, 16, 16)), _t(2, (2, 4, 16, 16))
    settings = GuidanceSettings(cfgpp=lam, dynthres_enabled=True, dynthres_mimic_scale=mimic,
                                dynthres_variability_measure=measure, dynthres_scaling_startpoint=start, **extra)
    stack = GuidanceStack(settings, 20, cfg_scale=7.0)
    stack.cfgpp_state.begin(sigma, sigma_next)
    x = _t(3, (2, 4, 16, 16))
    out = stack.combine(stack.plan(0), 0, x=x, sigma=torch.full((2,), sigma), d_cond=c, d_uncond=u)
    return out, c, u, x


@pytest.mark.parametrize("measure,start", [("STD", "MEAN"), ("AD", "ZERO"), ("AD", "MEAN")])
@pytest.mark.parametrize("sigma_next", [7.0, 9.5])
def test_cfgpp_dynthres_is_plain_cfg_dynthres_at_the_equivalent_scale(measure, start, sigma_next):
    sigma, lam = 10.0, 0.6
    out, c, u, x = _cfgpp_dynthres(measure, start, sigma, sigma_next, lam)
    keep = 1 - sigma_next / sigma
    omega = lam / keep  # 2 and 12
    plain = GuidanceStack(GuidanceSettings(dynthres_enabled=True, dynthres_variability_measure=measure,
                                           dynthres_scaling_startpoint=start), 20, cfg_scale=omega)
    d_plain = plain.combine(plain.plan(0), 0, x=x, sigma=torch.full((2,), sigma), d_cond=c, d_uncond=u)
    # The CFG++ step lands where the plain step at ω with the same thresholding lands.
    r = sigma_next / sigma
    assert torch.allclose(out + r * (x - u), d_plain + r * (x - d_plain), atol=1e-4)
    # The measure std(D − D_u)/std(λΔ) was 10.3 (STD), 9.3 (AD/ZERO), 1.0 (AD/MEAN) for
    # every step; now it is the plain-CFG ratio at ω, i.e. about mimic/ω once ω exceeds the mimic.
    ratio = float((out - u).std() / (lam * (c - u)).std())
    plain_ratio = float((d_plain - u).std() / (omega * (c - u)).std())
    assert ratio == pytest.approx(plain_ratio, rel=1e-4)
    if omega > 7:
        assert ratio == pytest.approx(7 / omega, rel=0.01)


def test_cfgpp_dynthres_std_gives_the_equivalent_step_the_mimic_spread():
    out, c, u, _ = _cfgpp_dynthres("STD", "MEAN", 10.0, 7.0)
    equivalent = u + (out - u) / 0.3
    mimic = u + 7 * (c - u)

    def spread(t):
        return (t - t.mean(dim=(2, 3), keepdim=True)).std(dim=(2, 3))

    assert torch.allclose(spread(equivalent), spread(mimic), rtol=1e-4)
    assert float((out - u).std() / (0.6 * (c - u)).std()) == pytest.approx(3.43, abs=0.01)  # was 10.3


def test_cfgpp_dynthres_schedules_the_cfg_equivalent_scale():
    # cfg_mode Linear Down with min 2 at 20 steps: on step 0 (f = 0) nothing changes; the scale
    # the schedule sees is ω = 12, so at f = 0.5 it would be 7, i.e. λ' = 7·(1 − r).
    out, c, u, _ = _cfgpp_dynthres("STD", "MEAN", 10.0, 9.5, dynthres_interpolate_phi=0.0,
                                   dynthres_cfg_mode="Linear Down", dynthres_cfg_scale_min=2.0)
    assert torch.allclose(out, u + 0.6 * (c - u), atol=1e-5)  # φ = 0: the raw (scheduled) CFG++ result
    stack = GuidanceStack(GuidanceSettings(cfgpp=0.6, dynthres_enabled=True, dynthres_interpolate_phi=0.0,
                                           dynthres_cfg_mode="Linear Down", dynthres_cfg_scale_min=2.0), 3, cfg_scale=7.0)
    stack.cfgpp_state.begin(10.0, 9.5)
    c2, u2 = _t(1), _t(2)
    mid = stack.combine(stack.plan(1), 1, x=_t(3), sigma=torch.full((2,), 10.0), d_cond=c2, d_uncond=u2)
    assert torch.allclose(mid, u2 + 0.05 * 7.0 * (c2 - u2), atol=1e-5)


def test_cfgpp_dynthres_needs_the_samplers_next_sigma():
    stack = _stack(cfgpp=0.6, dynthres_enabled=True)
    with pytest.raises(BadParameterError, match="next σ"):
        stack.combine(stack.plan(0), 0, x=_t(9), sigma=torch.ones(2), d_cond=_t(1), d_uncond=_t(2))
