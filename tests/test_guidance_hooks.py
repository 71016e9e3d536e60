import copy
import types

import pytest
import torch
from torch import nn

from lib_merge.errors import BadParameterError
from lib_merge.guidance import (
    GuidanceSettings,
    block_key,
    find_attention_layers,
    freeu_patch,
    install_attention_perturbations,
    install_freeu,
    parse_block_spec,
)
from lib_merge.testing import make_tiny_unet, random_conditioning

HW = (16, 8)  # non-square on purpose: the SEG grid must follow the latent's aspect ratio


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def unet(request):
    return make_tiny_unet(request.param)


def _inputs(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *HW, generator=g)
    t = torch.rand(n, generator=g) * 999
    cond = random_conditioning(model.config, n, seed=seed + 1)
    if isinstance(cond, dict):
        return x, t, cond["crossattn"], cond["vector"]
    return x, t, cond, None


def _run(model, x, t, context, y):
    with torch.no_grad():
        return model(x, t, context, y=y)


# --- layer selection -------------------------------------------------------------------------


def test_block_spec_parsing():
    assert parse_block_spec("all") is None
    assert parse_block_spec(" m00 ") == ["M00"]
    assert parse_block_spec("IN07,IN08") == ["IN07", "IN08"]
    assert parse_block_spec("OUT00-OUT02, M00") == ["OUT00", "OUT01", "OUT02", "M00"]
    assert block_key("OUT05") == ("output", 5) and block_key("M00") == ("middle", 0)
    for bad in ("", "X01", "IN01-OUT02", "OUT03-OUT01"):
        with pytest.raises(BadParameterError):
            parse_block_spec(bad)


def test_find_layers_middle_block_takes_every_transformer_block():
    sdxl = make_tiny_unet("sdxl")
    layers = find_attention_layers(sdxl, "M00")
    assert [p for _, p, _ in layers] == [
        "middle_block.1.transformer_blocks.0.attn1", "middle_block.1.transformer_blocks.1.attn1",
    ]
    assert all(m is sdxl.get_submodule(p) for _, p, m in layers)
    assert {b for b, _, _ in find_attention_layers(sdxl, "all")} == {"IN03", "IN05", "M00", "OUT00", "OUT01", "OUT02", "OUT03"}


def test_find_layers_errors_name_the_problem():
    sd1 = make_tiny_unet("sd1")
    with pytest.raises(BadParameterError, match="IN00 has no self-attention; choose from IN01"):
        find_attention_layers(sd1, "IN00")
    with pytest.raises(BadParameterError, match="no block IN40"):
        find_attention_layers(sd1, "IN40")
    with pytest.raises(BadParameterError, match="unrecognised U-Net layout"):
        find_attention_layers(nn.Linear(2, 2), "M00")


# --- PAG / SEG perturbations -----------------------------------------------------------------


def _identity_attention_copy(model, spec):
    """A copy of ``model`` whose chosen attn1 modules return to_out(to_v(x)), replaced per instance."""
    ref = copy.deepcopy(model)
    for _, _, attn in find_attention_layers(ref, spec):
        attn.forward = types.MethodType(lambda self, x, context=None, mask=None: self.to_out(self.to_v(x)), attn)
    return ref


def _mean_query_copy(model, spec):
    ref = copy.deepcopy(model)
    for _, _, attn in find_attention_layers(ref, spec):
        attn.to_q.register_forward_hook(lambda m, a, q: q.mean(dim=1, keepdim=True).expand_as(q))
    return ref


def test_pag_rows_equal_a_model_whose_attn1_returns_projected_v(unet):
    x, t, ctx, y = _inputs(unet, 3)
    handle = install_attention_perturbations(
        unet, pag_rows=slice(1, 3), seg_rows=None, pag_layers="all", seg_layers="M00", seg_sigma=1.0, latent_hw=HW
    )
    try:
        hooked = _run(unet, x, t, ctx, y)
    finally:
        handle.remove()
    reference = _run(_identity_attention_copy(unet, "all"), x, t, ctx, y)
    plain = _run(unet, x, t, ctx, y)
    assert torch.allclose(hooked[1:], reference[1:], atol=1e-5)
    assert torch.allclose(hooked[:1], plain[:1], atol=1e-5)
    assert not torch.allclose(hooked[1:], plain[1:], atol=1e-3)


def test_seg_infinite_sigma_rows_equal_mean_queries(unet):
    x, t, ctx, y = _inputs(unet, 2, seed=3)
    handle = install_attention_perturbations(
        unet, pag_rows=None, seg_rows=slice(1, 2), pag_layers="M00", seg_layers="all", seg_sigma=float("inf"),
        latent_hw=HW,
    )
    hooked = _run(unet, x, t, ctx, y)
    handle.remove()
    reference = _run(_mean_query_copy(unet, "all"), x, t, ctx, y)
    plain = _run(unet, x, t, ctx, y)
    assert torch.allclose(hooked[1], reference[1], atol=1e-5)
    assert torch.allclose(hooked[0], plain[0], atol=1e-5)


def test_batched_c_u_pag_seg_equals_four_separate_forwards(unet):
    b = 2
    x, t, ctx_c, y_c = _inputs(unet, b, seed=5)
    _, _, ctx_u, y_u = _inputs(unet, b, seed=7)
    cat = lambda *ts: None if ts[0] is None else torch.cat(ts)
    xb, tb = torch.cat([x] * 4), torch.cat([t] * 4)
    ctx_b, y_b = cat(ctx_c, ctx_u, ctx_c, ctx_c), cat(y_c, y_u, y_c, y_c)
    kw = {"pag_layers": "M00", "seg_layers": "all", "seg_sigma": 1.5, "latent_hw": HW}
    handle = install_attention_perturbations(unet, pag_rows=slice(2 * b, 3 * b), seg_rows=slice(3 * b, 4 * b), **kw)
    handle.set_rows(pag_rows=slice(2 * b, 3 * b), seg_rows=slice(3 * b, 4 * b), batch_size=4 * b)
    batched = _run(unet, xb, tb, ctx_b, y_b)
    handle.set_rows(pag_rows=None, seg_rows=None)
    d_c, d_u = _run(unet, x, t, ctx_c, y_c), _run(unet, x, t, ctx_u, y_u)
    handle.set_rows(pag_rows=slice(0, b), seg_rows=None)
    d_pag = _run(unet, x, t, ctx_c, y_c)
    handle.set_rows(pag_rows=None, seg_rows=slice(0, b))
    d_seg = _run(unet, x, t, ctx_c, y_c)
    handle.remove()
    separate = torch.cat([d_c, d_u, d_pag, d_seg])
    assert torch.allclose(batched, separate, atol=1e-5)
    # The perturbed passes really differ from the plain cond pass.
    assert not torch.allclose(d_pag, d_c, atol=1e-3) and not torch.allclose(d_seg, d_c, atol=1e-3)


def test_remove_is_idempotent_and_restores_the_model(unet):
    x, t, ctx, y = _inputs(unet, 1, seed=9)
    plain = _run(unet, x, t, ctx, y)
    handle = install_attention_perturbations(
        unet, pag_rows=slice(0, 1), seg_rows=slice(0, 1), pag_layers="all", seg_layers="all", seg_sigma=2.0, latent_hw=HW
    )
    assert not torch.allclose(_run(unet, x, t, ctx, y), plain, atol=1e-3)
    handle.remove()
    handle.remove()
    assert torch.equal(_run(unet, x, t, ctx, y), plain)


def test_a_forward_of_another_batch_size_is_left_alone(unet):
    x, t, ctx, y = _inputs(unet, 1, seed=11)
    plain = _run(unet, x, t, ctx, y)
    handle = install_attention_perturbations(
        unet, pag_rows=slice(0, 1), seg_rows=None, pag_layers="M00", seg_layers="M00", seg_sigma=1.0, latent_hw=HW
    )
    handle.set_rows(pag_rows=slice(0, 1), seg_rows=None, batch_size=3)
    assert torch.equal(_run(unet, x, t, ctx, y), plain) and handle.skipped_calls > 0
    handle.remove()


# --- FreeU -----------------------------------------------------------------------------------


def _manual_freeu_forward(model, x, t, ctx, y, settings):
    """UNetModel.forward with freeu_patch applied to (h, skip) before every decoder concatenation."""
    from lib_merge.testing.unet import timestep_embedding

    emb = model.time_embed(timestep_embedding(t, model.model_channels))
    if y is not None:
        emb = emb + model.label_emb(y)
    skips, h = [], x
    for block in model.input_blocks:
        h = block(h, emb, ctx)
        skips.append(h)
    h = model.middle_block(h, emb, ctx)
    for block in model.output_blocks:
        h, hsp = freeu_patch(
            h, skips.pop(), model_channels=model.model_channels, b1=settings.freeu_b1, b2=settings.freeu_b2,
            s1=settings.freeu_s1, s2=settings.freeu_s2, version=settings.freeu_version,
        )
        h = block(torch.cat([h, hsp], dim=1), emb, ctx)
    return model.out(h)


@pytest.mark.parametrize("version", [1, 2])
def test_freeu_hooks_match_patching_every_decoder_concatenation(unet, version):
    x, t, ctx, y = _inputs(unet, 2, seed=13)
    settings = GuidanceSettings(freeu_enabled=True, freeu_version=version, freeu_b1=1.3, freeu_b2=1.5, freeu_s1=0.8,
                                freeu_s2=0.3)
    active = [True]
    handle = install_freeu(unet, settings, model_channels=unet.model_channels, active=lambda: active[0])
    try:
        hooked = _run(unet, x, t, ctx, y)
        active[0] = False
        inactive = _run(unet, x, t, ctx, y)
    finally:
        handle.remove()
        handle.remove()
    with torch.no_grad():
        expected = _manual_freeu_forward(unet, x, t, ctx, y, settings)
    plain = _run(unet, x, t, ctx, y)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert not torch.allclose(hooked, plain, atol=1e-3)
    assert torch.equal(inactive, plain)


def test_freeu_hooks_neutral_factors_are_identity(unet):
    x, t, ctx, y = _inputs(unet, 1, seed=15)
    settings = GuidanceSettings(freeu_enabled=True, freeu_b1=1.0, freeu_b2=1.0, freeu_s1=1.0, freeu_s2=1.0)
    handle = install_freeu(unet, settings, model_channels=unet.model_channels, active=lambda: True)
    hooked = _run(unet, x, t, ctx, y)
    handle.remove()
    assert torch.equal(hooked, _run(unet, x, t, ctx, y))


def test_an_empty_layer_spec_installs_nothing_for_that_method():
    sd1 = make_tiny_unet("sd1")
    handle = install_attention_perturbations(
        sd1, pag_rows=None, seg_rows=slice(0, 1), pag_layers="", seg_layers="M00", seg_sigma=1.0, latent_hw=HW
    )
    assert handle.pag_layers == [] and len(handle.seg_layers) == 1
    handle.remove()


def test_freeu_hooks_keep_autograd_intact_when_gradients_are_on():
    sd1 = make_tiny_unet("sd1")
    x, t, ctx, y = _inputs(sd1, 1, seed=17)
    settings = GuidanceSettings(freeu_enabled=True, freeu_version=2, freeu_b1=1.2, freeu_b2=1.4, freeu_s1=0.9,
                                freeu_s2=0.2)
    with torch.no_grad():
        expected = _manual_freeu_forward(sd1, x, t, ctx, y, settings)
    handle = install_freeu(sd1, settings, model_channels=sd1.model_channels, active=lambda: True)
    x = x.clone().requires_grad_()
    out = sd1(x, t, ctx, y=y)
    out.sum().backward()
    handle.remove()
    assert torch.allclose(out.detach(), expected, atol=1e-5) and x.grad is not None
