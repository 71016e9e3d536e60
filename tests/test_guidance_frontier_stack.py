"""The frontier methods in the guidance stack: composition rules, who reads the uncond, proof of
effect, and end to end on the tiny U-Net (APG momentum under Heun, NAG in cross-attention)."""
import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.guidance import GuidanceSettings, GuidanceStack, GuidedDenoiser
from lib_merge.guidance.apg import apg_combine
from lib_merge.guidance.cfg_zero import cfg_zero_star
from lib_merge.guidance.fdg import fdg_combine
from lib_merge.guidance.mahiro import mahiro
from lib_merge.guidance.nag import nag_attention
from lib_merge.guidance.skimmed import skimmed_combine
from lib_merge.guidance.tcfg import tcfg_combine
from lib_merge.testing import EpsDenoiser, karras_sigmas, make_tiny_unet, random_conditioning, sample_heun

SHAPE = (2, 4, 6, 6)


def _t(seed, shape=SHAPE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _stack(cfg_scale=7.0, steps=10, **settings):
    return GuidanceStack(GuidanceSettings(**settings), steps, cfg_scale=cfg_scale)


def _combine(stack, step=0, sigma=2.0, **kw):
    plan = stack.plan(step, sigma=sigma)
    return stack.combine(plan, step, x=kw.pop("x", _t(99)), sigma=torch.full((2,), sigma), **kw)


# --- composition rules ----------------------------------------------------------------------


def test_two_combiners_are_one_clear_error_in_the_record_and_the_api():
    with pytest.raises(BadParameterError, match=r"^APG and TCFG each replace the CFG combine; turn on only one of"):
        GuidanceSettings(apg_enabled=True, tcfg_enabled=True)
    with pytest.raises(BadParameterError, match="CFG-Zero\\* and FDG"):
        GuidanceSettings.from_mapping({"cfgzero_enabled": "true", "fdg_enabled": True})
    with pytest.raises(BadParameterError, match="CFG\\+\\+ and Skimmed CFG"):
        GuidanceSettings(cfgpp=0.5, skimmed_enabled=True)
    with pytest.raises(BadParameterError, match="CFG interval"):
        GuidanceSettings(cfgpp=0.5, cfg_interval=True)
    # What stacks on a combiner is accepted.
    GuidanceSettings(apg_enabled=True, pag_scale=3, seg_scale=2, nag_scale=4, rescale_phi=0.7,
                     dynthres_enabled=True, cfg_interval=True, freeu_enabled=True)
    assert GuidanceSettings().combiner == "cfg" and not GuidanceSettings().any_on


def test_who_reads_the_uncond():
    # At CFG 1 a combiner returns D_c, so the uncond is skipped; FDG's high band still reads it.
    assert _stack(1.0, apg_enabled=True).plan(0).roles == ("cond",)
    assert _stack(1.0, skimmed_enabled=True, pag_scale=3).plan(0).roles == ("cond", "pag")
    assert _stack(1.0, fdg_enabled=True).plan(0).roles == ("cond", "uncond")
    assert _stack(1.0, fdg_enabled=True, fdg_high_scale=1.0).plan(0).roles == ("cond",)
    assert _stack(7.0, cfgzero_enabled=True).plan(0).roles == ("cond", "uncond")
    # NAG reads no uncond: NAG + untitled at CFG 1 is one row per image.
    nag = GuidanceStack(GuidanceSettings(untitled="empty", nag_scale=4), 10, cfg_scale=1.0, untitled_same_cond=True)
    plan = nag.plan(0)
    assert plan.roles == ("cond",) and plan.nag and plan.batch_size(2, 2) == 2 and plan.nag_rows(2, 2) == [slice(0, 2)]
    # NAG guides the cond rows and their perturbed copies, never the uncond rows.
    assert _stack(5.0, nag_scale=4, pag_scale=3).plan(0).nag_rows(2, 2) == [slice(0, 2), slice(4, 6)]
    # CFG-Zero* zero-init steps run only the cond rows (unless the host reads the uncond).
    zero = _stack(7.0, cfgzero_enabled=True, cfgzero_zero_init_steps=2, pag_scale=3, nag_scale=4)
    assert [zero.plan(i).roles for i in range(3)] == [("cond",), ("cond",), ("cond", "uncond", "pag")]
    assert not zero.plan(0).nag and zero.plan(2).nag
    assert zero.plan(0, host_reads_uncond=True).roles == ("cond", "uncond")


def test_cfg_interval_switches_guidance_off_outside_sigma_range():
    stack = _stack(7.0, cfg_interval=True, cfg_interval_low=0.28, cfg_interval_high=5.42, dynthres_enabled=True)
    high, inside = stack.plan(0, sigma=14.6), stack.plan(1, sigma=3.0)
    assert high.roles == ("cond",) and high.cfg_scale == 1.0 and high.dynthres is None and high.interval_off
    assert inside.roles == ("cond", "uncond") and inside.cfg_scale == 7.0 and not inside.is_trivial
    with pytest.raises(BadParameterError, match="σ"):
        stack.plan(0)
    c, u, p = _t(1), _t(2), _t(3)
    out = _combine(_stack(7.0, cfg_interval=True, pag_scale=2.0), sigma=14.6, d_cond=c, d_uncond=None, d_pag=p)
    assert torch.allclose(out, c + 2.0 * (c - p), atol=1e-6)  # PAG keeps its own window
    wide = _stack(7.0, cfg_interval=True, cfg_interval_low=0.0, cfg_interval_high=float("inf"))
    assert torch.allclose(_combine(wide, sigma=14.6, d_cond=c, d_uncond=u), u + 7 * (c - u), atol=1e-5)


# --- combine ---------------------------------------------------------------------------------

COMBINERS = {
    "apg": (dict(apg_enabled=True, apg_eta=0.3, apg_norm_threshold=2.0, apg_momentum=0.0),
            lambda x, c, u, w: apg_combine(c, u, w, eta=0.3, norm_threshold=2.0)[0]),
    "cfgzero": (dict(cfgzero_enabled=True), lambda x, c, u, w: cfg_zero_star(x, c, u, w)),
    "tcfg": (dict(tcfg_enabled=True), lambda x, c, u, w: tcfg_combine(x, c, u, w)),
    "mahiro": (dict(mahiro_enabled=True), lambda x, c, u, w: mahiro(u + w * (c - u), c, u, w)),
    "skimmed": (dict(skimmed_enabled=True, skimmed_scale=3.0),
                lambda x, c, u, w: skimmed_combine(x, c, u, w, 3.0)),
    "fdg": (dict(fdg_enabled=True, fdg_high_scale=12.0), lambda x, c, u, w: fdg_combine(c, u, w, 12.0)),
}


@pytest.mark.parametrize("name", COMBINERS)
def test_each_combiner_replaces_cfg_and_pag_stacks_on_top(name):
    settings, reference = COMBINERS[name]
    c, u, p, x = _t(1), _t(2), _t(3), _t(99) * 2
    stack = _stack(6.0, pag_scale=2.0, **settings)
    out = _combine(stack, x=x, d_cond=c, d_uncond=u, d_pag=p)
    assert torch.allclose(out, reference(x, c, u, 6.0) + 2.0 * (c - p), atol=1e-4)
    assert (out - (u + 6 * (c - u) + 2 * (c - p))).abs().max() > 1e-3  # it is not plain CFG
    assert not stack.effects.failures()


def test_combiners_use_the_effective_cond_of_and_prompts():
    c, u, x = _t(1, (3, 4, 6, 6)), _t(2), _t(99)
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]
    out = _combine(_stack(5.0, tcfg_enabled=True), x=x, d_cond=c, d_uncond=u, conds_list=conds_list)
    effective = torch.stack([u[0] + (c[0] - u[0]) + 0.5 * (c[1] - u[0]), c[2]])
    assert torch.allclose(out, tcfg_combine(x, effective, u, 5.0), atol=1e-4)


def test_zero_init_step_is_x():
    x, c = _t(99), _t(1)
    stack = _stack(7.0, cfgzero_enabled=True, cfgzero_zero_init_steps=1)
    assert torch.equal(_combine(stack, 0, x=x, d_cond=c, d_uncond=None), x)
    u = _t(2)
    assert torch.allclose(_combine(stack, 1, x=x, d_cond=c, d_uncond=u), cfg_zero_star(x, c, u, 7.0), atol=1e-5)


def test_apg_momentum_in_the_stack_advances_per_step_not_per_call():
    settings = dict(apg_enabled=True, apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=-0.5)
    stack = _stack(5.0, **settings)
    c = [_t(10 + i) for i in range(3)]
    u = [_t(20 + i) for i in range(3)]
    outs = [_combine(stack, step, d_cond=c[i], d_uncond=u[i]) for i, step in enumerate([0, 0, 1])]
    d = [c[i] - u[i] for i in range(3)]
    # The second call of step 0 builds on nothing; step 1 builds on step 0's first call.
    assert torch.allclose(outs[1], c[1] + 4 * d[1], atol=1e-5)
    assert torch.allclose(outs[2], c[2] + 4 * (d[2] - 0.5 * d[0]), atol=1e-5)


# --- proof of effect -------------------------------------------------------------------------


def test_effect_check_names_a_method_that_changed_nothing():
    c, u, x = _t(1), _t(2), _t(99)
    # APG with η = 1, no clip, no momentum is CFG itself: it acted on nothing.
    stack = _stack(6.0, apg_enabled=True, apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0, rescale_phi=0.7)
    _combine(stack, x=x, d_cond=c, d_uncond=u)
    failures = stack.effects.failures()
    assert [f.method for f in failures] == ["APG"]
    # Only rounding separates D_c + (w − 1)Δ from D_u + wΔ.
    assert failures[0].console_line.startswith("[Untitled Guidance] Guidance check: APG had no effect (max |ΔD| = ")
    assert failures[0].reason.endswith("with these settings it equals plain CFG") and failures[0].max_change < 1e-5
    assert stack.effects.infotext_value() == "APG had no effect"
    assert [f.method for f in stack.effects.new_failures()] == ["APG"] and stack.effects.new_failures() == []
    # PAG rows identical to the cond rows: its hook did nothing.
    pag = _stack(6.0, pag_scale=3.0)
    _combine(pag, x=x, d_cond=c, d_uncond=u, d_pag=c.clone())
    assert pag.effects.infotext_value() == "PAG had no effect"
    # c ≡ u: no CFG direction for a combiner; a method whose window lies past the run.
    same = GuidanceStack(GuidanceSettings(tcfg_enabled=True, seg_scale=2, seg_start=50), 10, cfg_scale=7.0,
                         untitled_same_cond=True)
    _combine(same, x=x, d_cond=c, d_uncond=None)
    same.finish()
    assert same.effects.infotext_value() == "TCFG had no effect; SEG had no effect"
    assert "c ≡ u" in same.effects.checks["TCFG"].reason and "not active" in same.effects.checks["SEG"].reason


def test_effect_check_of_the_interval():
    stack = _stack(7.0, cfg_interval=True)
    _combine(stack, sigma=3.0, d_cond=_t(1), d_uncond=_t(2))
    assert stack.effects.pending("CFG interval")  # inside the interval it has nothing to do yet
    _combine(stack, 1, sigma=14.0, d_cond=_t(1), d_uncond=None)
    assert stack.effects.checks["CFG interval"].acted
    inside = _stack(7.0, cfg_interval=True, cfg_interval_high=100.0)
    _combine(inside, sigma=14.0, d_cond=_t(1), d_uncond=_t(2))
    inside.finish()
    assert inside.effects.infotext_value() == "CFG interval had no effect"


# --- end to end on the tiny U-Net ------------------------------------------------------------


def _unet_setup(flavour="sd1"):
    unet = make_tiny_unet(flavour)
    cond = random_conditioning(unet.config, 2, seed=1)
    uncond = random_conditioning(unet.config, 2, seed=2)
    return unet, EpsDenoiser(unet), cond, uncond


@pytest.mark.parametrize("name", COMBINERS)
def test_combiners_end_to_end_on_the_tiny_unet(name):
    settings, reference = COMBINERS[name]
    unet, eps, cond, uncond = _unet_setup()
    x, sigma = _t(5, (2, 4, 8, 8)) * 3, torch.full((2,), 3.0)
    stack = GuidanceStack(GuidanceSettings(**settings), 10, cfg_scale=6.0)
    with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=cond, uncond=uncond) as den, torch.no_grad():
        out = den(x, sigma)
        d_c, d_u = eps(x, sigma, cond=cond), eps(x, sigma, cond=uncond)
    assert torch.allclose(out, reference(x, d_c, d_u, 6.0), atol=5e-4)
    assert not stack.effects.failures()


def test_apg_momentum_advances_once_per_heun_step_end_to_end():
    unet, eps, cond, uncond = _unet_setup()
    sigmas = karras_sigmas(4, 0.1, 10.0)
    x0 = _t(5, (2, 4, 8, 8)) * 10
    beta, w = -0.5, 5.0
    settings = GuidanceSettings(apg_enabled=True, apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=beta)

    # Oracle: our own Heun loop with APG written out; m advances on each step's first evaluation.
    def oracle():
        x, m = x0, None
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])

            def guided(xx, ss, commit):
                nonlocal m
                c = eps(xx, torch.full((2,), ss), cond=cond)
                u = eps(xx, torch.full((2,), ss), cond=uncond)
                buf = (c - u) if m is None else beta * m + (c - u)
                if commit:
                    guided.m_new = buf
                # η = 0, no clip: only the part of the buffer orthogonal to D_c remains.
                g = buf - (buf * c).flatten(1).sum(1).view(-1, 1, 1, 1) / (c * c).flatten(1).sum(1).view(-1, 1, 1, 1) * c
                return c + (w - 1) * g

            d = (x - guided(x, s, True)) / s
            m_step = guided.m_new
            if s_next == 0:
                x = x + d * (s_next - s)
            else:
                x2 = x + d * (s_next - s)
                d2 = (x2 - guided(x2, s_next, False)) / s_next
                x = x + (d + d2) / 2 * (s_next - s)
            m = m_step
        return x

    def run(calls_per_step):
        stack = GuidanceStack(settings, len(sigmas) - 1, cfg_scale=w)
        with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=cond, uncond=uncond,
                            calls_per_step=calls_per_step) as den:
            return sample_heun(den, x0, sigmas)

    with torch.no_grad():
        expected = oracle()
    per_step, per_call = run(2), run(1)
    assert torch.allclose(per_step, expected, atol=1e-3)
    # Advancing per model call (twice per Heun step) lands elsewhere.
    assert (per_call - expected).abs().max() > 1e-2


def _manual_nag_forward(attn, negative, phi, tau, alpha):
    """An attn2 forward that computes NAG itself (paper eqs. 6-8), for the cond rows given."""
    from lib_merge.guidance.nag import multihead_attention

    def forward(x, context=None, mask=None):
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        z = multihead_attention(q, k, v, attn.heads)
        z_neg = multihead_attention(q, attn.to_k(negative), attn.to_v(negative), attn.heads)
        return attn.to_out(nag_attention(z, z_neg, phi, tau, alpha))

    return forward


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_nag_at_cfg_one_end_to_end_matches_a_rewritten_cross_attention(flavour):
    unet, eps, cond, _ = _unet_setup(flavour)
    negative = random_conditioning(unet.config, 2, seed=3)
    x, sigma = _t(5, (2, 4, 8, 8)) * 3, torch.full((2,), 3.0)
    settings = GuidanceSettings(untitled="empty", nag_scale=4.0, nag_tau=2.5, nag_alpha=0.5)
    stack = GuidanceStack(settings, 10, cfg_scale=1.0, untitled_same_cond=True)
    with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=cond, uncond=cond, nag_negative=negative) as den, \
            torch.no_grad():
        out = den(x, sigma)
        rows = den.rows_per_step[0]
    assert rows == 2  # one row per image: no uncond at CFG 1 with c ≡ u
    neg_ctx = negative["crossattn"] if isinstance(negative, dict) else negative
    patched = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        plain = eps(x, sigma, cond=cond)
        for attn in patched:
            attn.forward = _manual_nag_forward(attn, neg_ctx, 4.0, 2.5, 0.5)
        try:
            manual = eps(x, sigma, cond=cond)
        finally:
            for attn in patched:
                del attn.forward
    assert torch.allclose(out, manual, atol=1e-4)
    assert (out - plain).abs().max() > 1e-2
    assert not stack.effects.failures()


def test_disconnected_hooks_are_named_by_the_effect_check():
    unet, eps, cond, uncond = _unet_setup()
    x, sigma = _t(5, (2, 4, 8, 8)) * 3, torch.full((2,), 3.0)
    settings = GuidanceSettings(pag_scale=3.0, nag_scale=4.0, freeu_enabled=True)

    def first_step(disconnect):
        stack = GuidanceStack(settings, 10, cfg_scale=5.0)
        with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=cond, uncond=uncond) as den, torch.no_grad():
            if disconnect:
                # What a host update or another extension replacing the layers looks like to us.
                for handle in (den._perturb, den._nag, den._freeu):
                    handle.remove()
            den(x, sigma)
            return stack.effects

    connected = first_step(False)
    assert connected.failures() == [] and connected.infotext_value() is None
    broken = first_step(True)
    assert broken.infotext_value() == "PAG had no effect; NAG had no effect; FreeU had no effect"
    lines = [f.console_line for f in broken.new_failures()]
    assert lines[0].startswith("[Untitled Guidance] Guidance check: PAG had no effect (max |ΔD| = ")
    assert all("hook was not reached" in line or "not installed" in line for line in lines), lines


def test_nag_with_an_all_zero_cond_is_reported_as_no_effect():
    unet, eps, cond, _ = _unet_setup()
    zero = torch.zeros_like(cond)
    stack = GuidanceStack(GuidanceSettings(untitled="zero", nag_scale=4.0), 10, cfg_scale=1.0, untitled_same_cond=True)
    with GuidedDenoiser(eps, stack, diffusion_model=unet, cond=zero, uncond=zero, nag_negative=cond) as den, \
            torch.no_grad():
        out = den(_t(5, (2, 4, 8, 8)), torch.full((2,), 3.0))
    assert torch.isfinite(out).all()
    assert stack.effects.infotext_value() == "NAG had no effect"
    assert "|ΔZ| = 0" in stack.effects.checks["NAG"].reason
