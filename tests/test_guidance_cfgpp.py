import math

import pytest
import torch

from lib_merge.guidance import (
    CfgppState,
    GuidanceSettings,
    GuidanceStack,
    GuidedDenoiser,
    cfgpp_equivalent_scale,
    cfgpp_state_of,
    get_ancestral_step,
    sample_ddim_cfgpp,
    sample_dpmpp_2m_cfgpp,
    sample_euler_ancestral_cfgpp,
    sample_euler_cfgpp,
)
from lib_merge.testing import (
    EpsDenoiser,
    karras_sigmas,
    make_tiny_unet,
    random_conditioning,
)

SIGMAS = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.1, 0.0])


def d_cond(x, sigma):
    return 0.6 * x / (1 + sigma) + 0.3


def d_uncond(x, sigma):
    return 0.4 * x / (1 + sigma) - 0.2


class ToyCfgpp:
    """Guided model: returns D_λ and records D_u, as the protocol asks."""

    def __init__(self, lam):
        self.lam = lam
        self.cfgpp_state = CfgppState()
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        s = sigma[:, None, None, None]
        du, dc = d_uncond(x, s), d_cond(x, s)
        self.cfgpp_state.record(du)
        return du + self.lam * (dc - du)


def plain_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i] * x.new_ones(x.shape[0]), i)
        x = d + (sigmas[i + 1] / sigmas[i]) * (x - d)
    return x


def test_euler_cfgpp_equals_plain_euler_with_the_derived_scale():
    lam = 0.6
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 10

    def omega_model(x, sigma, i):
        w = cfgpp_equivalent_scale(lam, float(SIGMAS[i]), float(SIGMAS[i + 1]))
        s = sigma[:, None, None, None]
        du, dc = d_uncond(x, s), d_cond(x, s)
        return du + w * (dc - du)

    ours = sample_euler_cfgpp(ToyCfgpp(lam), x, SIGMAS)
    assert torch.allclose(ours, plain_euler(omega_model, x, SIGMAS), atol=1e-5)


def test_lambda_zero_is_plain_euler_on_the_uncond():
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * 10
    ours = sample_euler_cfgpp(ToyCfgpp(0.0), x, SIGMAS)
    reference = plain_euler(lambda x, s, i: d_uncond(x, s[:, None, None, None]), x, SIGMAS)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_equivalent_scale_values():
    assert cfgpp_equivalent_scale(0.5, 10.0, 8.0) == pytest.approx(2.5)
    assert cfgpp_equivalent_scale(0.7, 1.0, 0.0) == pytest.approx(0.7)


def test_ddim_eta_zero_and_ancestral_eta_zero_equal_euler_cfgpp():
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)) * 10
    euler = sample_euler_cfgpp(ToyCfgpp(0.5), x, SIGMAS)
    assert torch.allclose(sample_ddim_cfgpp(ToyCfgpp(0.5), x, SIGMAS), euler)
    assert torch.allclose(sample_euler_ancestral_cfgpp(ToyCfgpp(0.5), x, SIGMAS, eta=0.0), euler)


def test_ancestral_step_formula_with_fixed_noise():
    x = torch.full((1, 1, 2, 2), 5.0)
    sigmas = torch.tensor([2.0, 1.0])
    z = torch.full_like(x, 0.5)
    out = sample_euler_ancestral_cfgpp(ToyCfgpp(0.8), x, sigmas, eta=1.0, s_noise=0.9, noise_sampler=lambda s, sn: z)
    down, up = get_ancestral_step(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    s = torch.tensor(2.0)
    du, dc = d_uncond(x, s), d_cond(x, s)
    expected = du + 0.8 * (dc - du) + down * (x - du) / 2.0 + 0.9 * up * z
    assert torch.allclose(out, expected)


def test_ancestral_step_edges():
    assert get_ancestral_step(3.0, 0.0, 1.0) == (0.0, 0.0)
    assert get_ancestral_step(3.0, 2.0, 0.0) == (2.0, 0.0)
    down, up = get_ancestral_step(3.0, 2.0, 0.5)
    assert up == pytest.approx(0.5 * 2.0 * math.sqrt(9 - 4) / 3.0) and down**2 + up**2 == pytest.approx(4.0)


def test_dpmpp_2m_cfgpp_first_and_second_step_formulas():
    lam = 0.7
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3)) * 10
    sig = torch.tensor([8.0, 3.0, 1.0])
    one = sample_dpmpp_2m_cfgpp(ToyCfgpp(lam), x0, sig[:2])
    s0 = sig[0]
    du0, dc0 = d_uncond(x0, s0), d_cond(x0, s0)
    dl0 = du0 + lam * (dc0 - du0)
    x1 = dl0 + (3.0 / 8.0) * (x0 - du0)  # first step: e^{-h} = σ1/σ0
    assert torch.allclose(one, x1, atol=1e-5)

    two = sample_dpmpp_2m_cfgpp(ToyCfgpp(lam), x0, sig)
    s1 = sig[1]
    du1, dc1 = d_uncond(x1, s1), d_cond(x1, s1)
    dl1 = du1 + lam * (dc1 - du1)
    h_prev, h = math.log(8 / 3), math.log(3 / 1)
    r = h_prev / h
    x2 = math.exp(-h) * (x1 - du1) + dl1 + (1 - math.exp(-h)) / (2 * r) * (dl1 - du0)
    assert torch.allclose(two, x2, atol=1e-4)


def test_dpmpp_2m_cfgpp_last_step_lands_on_the_guided_x0():
    model = ToyCfgpp(0.5)
    out = sample_dpmpp_2m_cfgpp(model, torch.ones(1, 1, 2, 2), torch.tensor([2.0, 0.0]))
    s = torch.tensor(2.0)
    x = torch.ones(1, 1, 2, 2)
    assert torch.allclose(out, d_uncond(x, s) + 0.5 * (d_cond(x, s) - d_uncond(x, s)))


def test_a_model_that_does_not_record_the_uncond_is_an_error():
    with pytest.raises(TypeError, match="record"):
        sample_euler_cfgpp(lambda x, sigma: x, torch.ones(1, 1, 2, 2), SIGMAS)


def test_state_is_found_on_the_model_or_attached_to_it():
    class Bare:
        pass

    bare = Bare()
    state = cfgpp_state_of(bare)
    assert bare.cfgpp_state is state
    explicit = CfgppState()
    assert cfgpp_state_of(bare, explicit) is explicit


def test_callback_sees_guided_denoised():
    seen = []
    sample_euler_cfgpp(ToyCfgpp(0.5), torch.ones(1, 1, 2, 2), SIGMAS[:3], callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1] and set(seen[0]) >= {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_cfgpp_runs_through_the_stack_on_the_tiny_unet():
    unet = make_tiny_unet("sd1")
    cond, uncond = random_conditioning(unet.config, 1, seed=1), random_conditioning(unet.config, 1, seed=2)
    settings = GuidanceSettings(cfgpp=0.6)
    sigmas = karras_sigmas(3, 0.03, 14.6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    stack = GuidanceStack(settings, 3, cfg_scale=1.0)
    # CFG++ keeps the uncond pass even at CFG 1: the renoise step needs it.
    assert stack.plan(0).roles == ("cond", "uncond") and stack.plan(0).cfg_scale == 0.6
    with GuidedDenoiser(EpsDenoiser(unet), stack, diffusion_model=unet, cond=cond, uncond=uncond) as denoiser:
        out = sample_euler_cfgpp(denoiser, x, sigmas)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert denoiser.cfgpp_state is stack.cfgpp_state and stack.cfgpp_state.uncond is not None


def _toy_inner(x, sigma, cond):
    # Any deterministic x0 predictor will do: the comparison below is exact algebra around it.
    s = sigma[:, None, None, None]
    return 0.5 * x / (1 + s) + cond


@pytest.mark.parametrize("sampler,eta", [(sample_euler_cfgpp, None), (sample_euler_ancestral_cfgpp, 0.7), (sample_ddim_cfgpp, 0.5)])
def test_cfgpp_with_dynthres_steps_like_plain_cfg_with_dynthres_at_the_equivalent_scale(sampler, eta):
    """Issue 9 item 6: the mimic scale is on the CFG axis, so a CFG++ step with dynamic thresholding must
    land where the plain step at ω = λσ/(σ − σ_tgt) with the same thresholding lands."""
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen) * 10.0
    z = torch.randn(2, 4, 8, 8, generator=gen)
    sigma, sigma_next, lam = 10.0, 8.0, 0.6
    dyn = dict(dynthres_enabled=True, dynthres_mimic_scale=7.0, dynthres_variability_measure="STD")
    stack = GuidanceStack(GuidanceSettings(cfgpp=lam, **dyn), 1, cfg_scale=7.0)
    kwargs = {} if eta is None else {"eta": eta, "noise_sampler": lambda *_: z}
    with GuidedDenoiser(_toy_inner, stack, diffusion_model=torch.nn.Module(), cond=cond, uncond=uncond) as den:
        out = sampler(den, x, torch.tensor([sigma, sigma_next]), **kwargs)
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta or 0.0)
    omega = cfgpp_equivalent_scale(lam, sigma, sigma_down)
    plain = GuidanceStack(GuidanceSettings(**dyn), 1, cfg_scale=omega)
    with GuidedDenoiser(_toy_inner, plain, diffusion_model=torch.nn.Module(), cond=cond, uncond=uncond) as den:
        d = den(x, torch.tensor(sigma))
    expected = d + (sigma_down / sigma) * (x - d) + sigma_up * z
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert stack.cfgpp_state.renoise_ratio == pytest.approx(sigma_down / sigma)


def test_dpmpp_2m_cfgpp_tells_the_stack_its_first_order_ratio():
    class RatioSpy(ToyCfgpp):
        def __call__(self, x, sigma):
            self.ratios.append(self.cfgpp_state.renoise_ratio)
            return super().__call__(x, sigma)

    spy = RatioSpy(0.5)
    spy.ratios = []
    sample_dpmpp_2m_cfgpp(spy, torch.ones(1, 1, 2, 2), SIGMAS)
    assert spy.ratios == pytest.approx([float(SIGMAS[i + 1] / SIGMAS[i]) for i in range(len(SIGMAS) - 1)])
