"""LoRA formats, key mapping, per-module delta math and baking one key (lora-reference.md §1–3, §9).

Every expected value is computed independently of lib_merge.lora: the mapping against the
reference's own table, the deltas by explicit loops / a functional forward pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lib_merge.arch import SD1, SDXL
from lib_merge.errors import ArchitectureMismatchError, CorruptFileError, MergeError
from lib_merge.io.reader import open_checkpoint
from lib_merge.lora.bake import apply_patches
from lib_merge.lora.blockweights import lora_block_weights
from lib_merge.lora.delta import dora_apply, lokr_delta, loha_delta, lora_delta, scale
from lib_merge.lora.formats import LoraFile, LoraFormatError
from lib_merge.lora.keymap import checkpoint_keymap, normalise
from lib_merge.lora.patches import LoraSpec, bind

DATA = Path(__file__).parent / "data"
U = "model.diffusion_model."


def shapes_of(name: str) -> dict[str, tuple]:
    return {k: tuple(v) for k, v in json.loads((DATA / f"{name}.json").read_text())["shapes"].items()}


@pytest.fixture(scope="module")
def sd1_map():
    return checkpoint_keymap(shapes_of("sd1"))


@pytest.fixture(scope="module")
def sdxl_map():
    return checkpoint_keymap(shapes_of("sdxl"))


SD1_TABLE = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0": "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1": "input_blocks.1.0.in_layers.2.weight",
    "lora_unet_down_blocks_0_resnets_0_conv2": "input_blocks.1.0.out_layers.3.weight",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "input_blocks.1.0.emb_layers.1.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv.weight",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv.weight",
    "lora_unet_conv_in": "input_blocks.0.0.weight",
    "lora_unet_conv_out": "out.2.weight",
    "lora_unet_time_embedding_linear_1": "time_embed.0.weight",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection.weight",
    "lora_unet_mid_block_resnets_1_conv2": "middle_block.2.out_layers.3.weight",
}
SDXL_TABLE = {
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": "input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight",
    "lora_unet_input_blocks_7_1_proj_in": "input_blocks.7.1.proj_in.weight",
    "lora_unet_output_blocks_3_0_skip_connection": "output_blocks.3.0.skip_connection.weight",
    "lora_unet_input_blocks_3_0_op": "input_blocks.3.0.op.weight",
    "lora_unet_output_blocks_2_2_conv": "output_blocks.2.2.conv.weight",
    "lora_unet_add_embedding_linear_2": "label_emb.0.2.weight",
    "lora_unet_time_embedding_linear_1": "time_embed.0.weight",
    # diffusers-named SDXL (OneTrainer): the upsamplers sit at .2.2 and .5.2, not A1111's SD1 rule
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.2.conv.weight",
    "lora_unet_up_blocks_1_upsamplers_0_conv": "output_blocks.5.2.conv.weight",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_3_attn2_to_k": "output_blocks.1.1.transformer_blocks.3.attn2.to_k.weight",
}


def test_sd1_reference_table(sd1_map):
    for name, key in SD1_TABLE.items():
        assert sd1_map[name].key == U + key, name
    te = sd1_map["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te.key == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def test_sdxl_reference_table(sdxl_map):
    for name, key in SDXL_TABLE.items():
        assert sdxl_map[name].key == U + key, name
    assert sdxl_map["lora_te1_text_model_encoder_layers_11_mlp_fc2"].key == \
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    k = sdxl_map["lora_te2_text_model_encoder_layers_31_self_attn_k_proj"]
    assert (k.key, k.rows) == ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (1280, 2560))
    assert sdxl_map["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].rows == (2560, 3840)
    assert sdxl_map["lora_te2_text_model_encoder_layers_5_mlp_fc1"].key.endswith("resblocks.5.mlp.c_fc.weight")
    assert sdxl_map["lora_te2_text_model_encoder_layers_5_self_attn_out_proj"].key.endswith("resblocks.5.attn.out_proj.weight")
    assert sdxl_map["lora_te2_text_projection"].transpose
    # PEFT / diffusers spellings of the same module
    assert sdxl_map[normalise("unet.up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_k", True)].key == \
        U + SDXL_TABLE["lora_unet_up_blocks_0_attentions_1_transformer_blocks_3_attn2_to_k"]
    assert sdxl_map[normalise("lycoris_input_blocks_3_0_op", True)].key == U + "input_blocks.3.0.op.weight"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_unet_layer_has_its_ldm_and_diffusers_name(arch):
    """Every weight kohya/LyCORIS can train (≥ 2-D, U-Net) is reachable by its ldm name and by a
    distinct diffusers name, and both land on the same key; no two keys share a name."""
    shapes = shapes_of(arch)
    table = checkpoint_keymap(shapes)
    by_key: dict[str, list[str]] = {}
    for name, target in table.items():
        by_key.setdefault(target.key, []).append(name)
    unet = [k for k, s in shapes.items() if k.startswith(U) and k.endswith(".weight") and len(s) >= 2]
    kinds = set()
    for key in unet:
        names = by_key.get(key, [])
        assert len(names) == 2, (key, names)
        path = key[len(U):-len(".weight")]
        kinds.add(path.split(".")[0] + ":" + ".".join(p for p in path.split(".")[2:] if not p.isdigit())[:20])
    assert len(unet) > 200 and len(kinds) > 20


def test_alpha_scale_forms():
    r = 4
    for alpha, want in ((None, 1.0), (torch.tensor(2, dtype=torch.int64), 0.5), (torch.tensor(8.0, dtype=torch.float16), 2.0)):
        parts = {"lora_down.weight": torch.zeros(r, 3)}
        if alpha is not None:
            parts["alpha"] = alpha
        assert scale("lora", parts) == want
    with pytest.warns(UserWarning, match="alpha 0"):
        assert scale("lora", {"lora_down.weight": torch.zeros(r, 3), "alpha": torch.tensor(0.0)}) == 1.0


def test_tucker_loha_lokr_match_loops():
    g = torch.Generator().manual_seed(0)
    r, o, i, k = 2, 3, 4, 3
    up, mid, down = torch.randn(o, r, 1, 1, generator=g), torch.randn(r, r, k, k, generator=g), torch.randn(r, i, 1, 1, generator=g)
    want = torch.zeros(o, i, k, k)
    for a in range(o):
        for b in range(i):
            for n in range(r):
                for m in range(r):
                    want[a, b] += mid[n, m] * up[a, n, 0, 0] * down[m, b, 0, 0]
    got = lora_delta({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid})
    torch.testing.assert_close(got, want)
    # LoHa: Hadamard product of two low-rank products
    w = [torch.randn(*s, generator=g) for s in ((o, r), (r, i), (o, r), (r, i))]
    got = loha_delta(dict(zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), w)))
    want = torch.tensor([[sum(w[0][a, p] * w[1][p, b] for p in range(r)) * sum(w[2][a, p] * w[3][p, b] for p in range(r))
                          for b in range(i)] for a in range(o)])
    torch.testing.assert_close(got, want)
    # LoKr conv with a 2-D w2: kron(w1, w2 as [b, d, kh, kw])
    w1, w2a, w2b = torch.randn(2, 2, generator=g), torch.randn(3, r, generator=g), torch.randn(r, 2 * 9, generator=g)
    got = lokr_delta({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, (6, 4, 3, 3))
    w2 = (w2a @ w2b).reshape(3, 2, 3, 3)
    for a in range(2):
        for c in range(2):
            torch.testing.assert_close(got[a * 3:(a + 1) * 3, c * 2:(c + 1) * 2], w1[a, c] * w2)
    # LoKr with both factors full has s = 1 whatever alpha says
    assert scale("lokr", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(3.0)}) == 1.0


def _ckpt(tmp_path, arch="sd1"):
    from lib_merge.synthetic import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path / f"{arch}.safetensors", arch, width_divisor=32, dtype=torch.float32)
    return open_checkpoint(path)


def _bake(tmp_path, reader, tensors, strength=1.0, weights=None, arch=SD1, name="l.safetensors", metadata=None):
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    lora = LoraFile(tmp_path / name)
    binding = bind([(lora, LoraSpec(name, strength, weights))], reader.shapes(), arch, "supermerger")
    out = {}
    for key, patches in binding.patches.items():
        out[key] = apply_patches(reader.get(key).float().clone(), patches)
    return out, binding


@pytest.mark.parametrize("alpha", [None, torch.tensor(2, dtype=torch.int64), torch.tensor(2.0, dtype=torch.float16)])
def test_bake_equals_functional_forward(tmp_path, alpha):
    """conv(x, W') = conv(x, W) + μ·s·up(down(x)) for a Linear, a 1×1 conv (SD1 proj_in) and a 3×3 conv."""
    reader = _ckpt(tmp_path)
    g = torch.Generator().manual_seed(1)
    layers = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1": "input_blocks.1.0.in_layers.2.weight",
    }
    tensors, r, mu = {}, 4, 0.7
    for name, key in layers.items():
        w = reader.infos[U + key].shape
        kernel = w[2:]
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, w[1], *kernel, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(w[0], r, *([1, 1] if kernel else []), generator=g)
        if alpha is not None:
            tensors[f"{name}.alpha"] = alpha.clone()
    baked, _ = _bake(tmp_path, reader, tensors, mu)
    s = 1.0 if alpha is None else 2.0 / r
    for name, key in layers.items():
        w = reader.get(U + key).float()
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        if w.dim() == 2:
            x = torch.randn(5, w.shape[1], generator=g)
            want = x @ w.T + mu * s * (x @ down.T @ up.T)
            got = x @ baked[U + key].T
        else:
            x = torch.randn(1, w.shape[1], 6, 6, generator=g)
            pad = w.shape[2] // 2
            want = F.conv2d(x, w, padding=pad) + mu * s * F.conv2d(F.conv2d(x, down, padding=pad), up)
            got = F.conv2d(x, baked[U + key], padding=pad)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_te2_slices_and_text_projection(tmp_path):
    reader = _ckpt(tmp_path, "sdxl")
    key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    d = reader.infos[key].shape[1]
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for proj in ("q", "v"):  # no k: rows d:2d must stay bit-identical
        name = f"lora_te2_text_model_encoder_layers_3_self_attn_{proj}_proj"
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, d, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(d, 2, generator=g)
    proj_key = "conditioner.embedders.1.model.text_projection"
    p_shape = reader.infos[proj_key].shape
    tensors["lora_te2_text_projection.lora_down.weight"] = torch.randn(2, p_shape[0], generator=g)
    tensors["lora_te2_text_projection.lora_up.weight"] = torch.randn(p_shape[1], 2, generator=g)
    baked, _ = _bake(tmp_path, reader, tensors, arch=SDXL)
    w = reader.get(key).float()
    out = baked[key]
    assert torch.equal(out[d:2 * d], w[d:2 * d])
    for i, proj in enumerate("qv"):
        name = f"lora_te2_text_model_encoder_layers_3_self_attn_{proj}_proj"
        rows = slice(0, d) if proj == "q" else slice(2 * d, 3 * d)
        torch.testing.assert_close(out[rows], w[rows] + tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"])
    # OpenCLIP computes x·P; the HF-trained delta is a Linear weight [out, in] = Pᵀ
    delta = tensors["lora_te2_text_projection.lora_up.weight"] @ tensors["lora_te2_text_projection.lora_down.weight"]
    torch.testing.assert_close(baked[proj_key], reader.get(proj_key).float() + delta.T)


def test_dora_axis_strength_and_peft_form(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g)
    delta = torch.randn(6, 5, generator=g) * 0.1
    m_row = torch.rand(6, 1, generator=g) + 0.5
    w0 = w.clone()
    dora_apply(w0, delta, m_row, 0.0)
    assert torch.equal(w0, w)
    w1 = w.clone()
    dora_apply(w1, delta, m_row, 1.0)
    wd = w + delta
    torch.testing.assert_close(w1, m_row * wd / wd.norm(dim=1, keepdim=True))
    m_col = torch.rand(1, 5, generator=g) + 0.5
    w2 = w.clone()
    dora_apply(w2, delta, m_col, 1.0)
    torch.testing.assert_close(w2, m_col * wd / wd.norm(dim=0, keepdim=True))
    w3 = w.clone()
    dora_apply(w3, delta, m_row.reshape(6), 1.0)  # PEFT lora_magnitude_vector [out]
    assert torch.equal(w3, w1)


def test_ia3_full_bias_and_norm(tmp_path):
    reader = _ckpt(tmp_path)
    g = torch.Generator().manual_seed(4)
    lin = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    key = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight"
    ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    ff_key = U + "input_blocks.4.1.transformer_blocks.0.ff.net.2"
    o = reader.infos[key].shape[0]
    f_shape = reader.infos[ff_key + ".weight"].shape
    tensors = {f"{lin}.weight": torch.randn(o, generator=g),
               f"{ff}.diff": torch.randn(*f_shape, generator=g), f"{ff}.diff_b": torch.randn(f_shape[0], generator=g)}
    baked, binding = _bake(tmp_path, reader, tensors, 0.5)
    w = reader.get(key).float()
    torch.testing.assert_close(baked[key], w + 0.5 * w * tensors[f"{lin}.weight"][:, None])
    torch.testing.assert_close(baked[ff_key + ".weight"], reader.get(ff_key + ".weight").float() + 0.5 * tensors[f"{ff}.diff"])
    torch.testing.assert_close(baked[ff_key + ".bias"], reader.get(ff_key + ".bias").float() + 0.5 * tensors[f"{ff}.diff_b"])
    assert key[:-len("weight")] + "bias" not in binding.patches  # IA3 changes no bias


def test_lbw_vectors_zero_fill_by_name():
    w = lora_block_weights("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", SD1)
    assert w["IN00"] == w["IN03"] == w["OUT00"] == w["OUT02"] == 0 and w["IN01"] == w["OUT11"] == w["BASE"] == 1
    x = lora_block_weights("1,0,0,0,0,1,0,0,0,0,0,1", SDXL)  # BASE, IN04, IN05, IN07, IN08, M00, OUT00..05
    assert x["BASE"] == x["M00"] == x["OUT05"] == 1 and x["IN00"] == x["OUT06"] == x["IN04"] == 0
    out = lora_block_weights("lbw:OUTD", SD1)
    assert [b for b, v in out.items() if v] == ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"]
    assert lora_block_weights("IN04=0.3", SD1)["IN04"] == 0.3 and lora_block_weights("IN04=0.3", SD1)["OUT00"] == 1


def test_block_weights_scale_the_patch(tmp_path):
    reader = _ckpt(tmp_path)
    tensors = {}
    g = torch.Generator().manual_seed(5)
    for name, key in (("lora_unet_down_blocks_1_attentions_0_proj_in", "input_blocks.4.1.proj_in.weight"),
                      ("lora_unet_up_blocks_1_attentions_0_proj_in", "output_blocks.3.1.proj_in.weight")):
        s = reader.infos[U + key].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, s[1], 1, 1, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(s[0], 2, 1, 1, generator=g)
    baked, _ = _bake(tmp_path, reader, tensors, 1.0, weights="lbw:OUTD")
    assert torch.equal(baked[U + "input_blocks.4.1.proj_in.weight"], reader.get(U + "input_blocks.4.1.proj_in.weight").float())
    assert not torch.equal(baked[U + "output_blocks.3.1.proj_in.weight"], reader.get(U + "output_blocks.3.1.proj_in.weight").float())


def test_unmapped_modules_are_reported(tmp_path):
    reader = _ckpt(tmp_path)
    s = reader.infos[U + "input_blocks.1.1.proj_in.weight"].shape
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, s[1], 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(s[0], 2, 1, 1)}
    for i in range(4):
        tensors[f"lora_unet_nowhere_{i}.lora_down.weight"] = torch.ones(2, 3)
        tensors[f"lora_unet_nowhere_{i}.lora_up.weight"] = torch.ones(3, 2)
    _, binding = _bake(tmp_path, reader, tensors)
    assert len(binding.warnings) == 1 and "4 module(s)" in binding.warnings[0] and "lora_unet_nowhere_0" in binding.warnings[0]


def test_bad_lora_files_one_clear_error_each(tmp_path):
    reader = _ckpt(tmp_path)
    from lib_merge.lora.synthetic import synthetic_lora

    good = synthetic_lora(reader.shapes(), "sd1", rank=2)
    save_file(good, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        LoraFile(tmp_path / "cut.safetensors")
    # unknown module type
    save_file({"lora_unet_x.oft_blocks": torch.ones(2, 2)}, str(tmp_path / "oft.safetensors"))
    with pytest.raises(LoraFormatError, match="oft_blocks"):
        LoraFile(tmp_path / "oft.safetensors")
    # a checkpoint given as a LoRA
    with pytest.raises(LoraFormatError, match="checkpoint, not a LoRA"):
        LoraFile(reader.path)
    # an SDXL LoRA on an SD1 checkpoint: by its metadata, and by its shapes when it has none
    xl = _ckpt(tmp_path, "sdxl")
    xl_lora = synthetic_lora(xl.shapes(), "sdxl", rank=2, text=False)
    with pytest.raises(ArchitectureMismatchError, match="SDXL"):
        _bake(tmp_path, reader, xl_lora, name="xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ArchitectureMismatchError, match="another architecture"):
        _bake(tmp_path, reader, xl_lora, name="xl2.safetensors")
