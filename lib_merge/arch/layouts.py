"""Key -> (shape, kind) layouts of single-file checkpoints, generated from each family's config.

The library builds synthetic checkpoints (demo models, benchmarks, test fixtures) from these
without needing any reference file. With ``width_divisor=1`` the layouts are those of the released
SD1.x and SDXL checkpoints (checked key for key by the tests) and of SD2.1 768-v.

``width_divisor=k`` shrinks a layout for demo models: every channel count and hidden width (U-Net
model channels and hence the time embedding and attention context, text-encoder widths and
projections, VAE channels, the SDXL size-embedding width) and the token vocabulary are divided by
``k``. Kept as they are: every key name (so depths and block counts stay), the 77-token sequence
length, latent and image channels (4 / 8 / 3 and 9 for inpainting) and kernel sizes. ``k`` must
divide every width, so it is a power of two up to 64. GroupNorm would need channels divisible by
32 to run, but these files are only merged and inspected, never executed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..errors import BadParameterError, UnknownArchitectureError
from .spec import SD1, SD2, SDXL, ArchSpec, get_arch

Shape = Tuple[int, ...]
Layout = Dict[str, Tuple[Shape, str]]

LATENT_CHANNELS = 4
INPAINT_CHANNELS = 9  # latent + masked-image latent + mask
TEXT_TOKENS = 77


@dataclass(frozen=True)
class _UNetConfig:
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    depth_per_level: Tuple[int, ...]  # transformer blocks per level; 0 = no attention there
    middle_depth: int
    context_dim: int
    linear_proj: bool
    adm_in: Optional[int]  # SDXL vector conditioning width (label_emb); None = no label_emb


@dataclass(frozen=True)
class _CLIPConfig:
    """HF CLIPTextModel as stored by ldm/sgm (``transformer.text_model.*``)."""

    width: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class _OpenCLIPConfig:
    """open_clip text tower as stored by ldm/sgm (``model.*``)."""

    width: int
    layers: int
    vocab: int
    proj_dim: int


@dataclass(frozen=True)
class _VAEConfig:
    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    z_channels: int


_VOCAB = 49408
_VAE = _VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=LATENT_CHANNELS)
_CLIP_L = _CLIPConfig(width=768, layers=12, vocab=_VOCAB)
_OPENCLIP_H = _OpenCLIPConfig(width=1024, layers=24, vocab=_VOCAB, proj_dim=1024)
_OPENCLIP_BIGG = _OpenCLIPConfig(width=1280, layers=32, vocab=_VOCAB, proj_dim=1280)
# SDXL's vector conditioning: pooled bigG text embedding + 6 size/crop scalars of 256 Fourier
# features each (original size, crop top-left, target size).
_SDXL_SIZE_FEATURES = 6 * 256

_SD1_UNET = _UNetConfig(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, 768, False, None)
_SD2_UNET = _UNetConfig(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, 1024, True, None)
_SDXL_UNET = _UNetConfig(
    320, (1, 2, 4), 2, (0, 2, 10), 10, 768 + 1280, True, 1280 + _SDXL_SIZE_FEATURES
)

# Every width a divisor must split evenly (320 limits it to 64).
_DIVIDED_WIDTHS = (320, 768, 1024, 1280, 128, 256, _VOCAB)


class _Builder:
    def __init__(self) -> None:
        self.layout: Layout = {}

    def add(self, key: str, *shape: int) -> None:
        self.layout[key] = (tuple(shape), "float")

    def add_int(self, key: str, *shape: int) -> None:
        self.layout[key] = (tuple(shape), "int")

    def linear(self, prefix: str, out_f: int, in_f: int, bias: bool = True) -> None:
        self.add(f"{prefix}.weight", out_f, in_f)
        if bias:
            self.add(f"{prefix}.bias", out_f)

    def conv(self, prefix: str, out_c: int, in_c: int, kernel: int) -> None:
        self.add(f"{prefix}.weight", out_c, in_c, kernel, kernel)
        self.add(f"{prefix}.bias", out_c)

    def norm(self, prefix: str, channels: int) -> None:
        self.add(f"{prefix}.weight", channels)
        self.add(f"{prefix}.bias", channels)


# ---- U-Net (ldm openaimodel naming) -------------------------------------------------------------


def _res_block(b: _Builder, p: str, in_c: int, out_c: int, emb: int) -> None:
    b.norm(f"{p}.in_layers.0", in_c)
    b.conv(f"{p}.in_layers.2", out_c, in_c, 3)
    b.linear(f"{p}.emb_layers.1", out_c, emb)
    b.norm(f"{p}.out_layers.0", out_c)
    b.conv(f"{p}.out_layers.3", out_c, out_c, 3)
    if in_c != out_c:
        b.conv(f"{p}.skip_connection", out_c, in_c, 1)


def _spatial_transformer(b: _Builder, p: str, c: int, depth: int, cfg: _UNetConfig) -> None:
    b.norm(f"{p}.norm", c)
    for proj in ("proj_in", "proj_out"):
        if cfg.linear_proj:
            b.linear(f"{p}.{proj}", c, c)
        else:
            b.conv(f"{p}.{proj}", c, c, 1)
    for i in range(depth):
        t = f"{p}.transformer_blocks.{i}"
        for attn, kv_in in (("attn1", c), ("attn2", cfg.context_dim)):
            b.linear(f"{t}.{attn}.to_q", c, c, bias=False)
            b.linear(f"{t}.{attn}.to_k", c, kv_in, bias=False)
            b.linear(f"{t}.{attn}.to_v", c, kv_in, bias=False)
            b.linear(f"{t}.{attn}.to_out.0", c, c)
        # GEGLU: one projection yields value and gate, hence 2 x the 4c inner width.
        b.linear(f"{t}.ff.net.0.proj", 8 * c, c)
        b.linear(f"{t}.ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            b.norm(f"{t}.{n}", c)


def _unet(b: _Builder, cfg: _UNetConfig, in_channels: int) -> None:
    p = "model.diffusion_model"
    mc = cfg.model_channels
    emb = 4 * mc
    b.linear(f"{p}.time_embed.0", emb, mc)
    b.linear(f"{p}.time_embed.2", emb, emb)
    if cfg.adm_in is not None:
        b.linear(f"{p}.label_emb.0.0", emb, cfg.adm_in)
        b.linear(f"{p}.label_emb.0.2", emb, emb)

    b.conv(f"{p}.input_blocks.0.0", mc, in_channels, 3)
    skip_channels: List[int] = [mc]
    ch = mc
    index = 1
    last_level = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            _res_block(b, f"{p}.input_blocks.{index}.0", ch, mult * mc, emb)
            ch = mult * mc
            if cfg.depth_per_level[level]:
                _spatial_transformer(
                    b, f"{p}.input_blocks.{index}.1", ch, cfg.depth_per_level[level], cfg
                )
            skip_channels.append(ch)
            index += 1
        if level != last_level:
            b.conv(f"{p}.input_blocks.{index}.0.op", ch, ch, 3)
            skip_channels.append(ch)
            index += 1

    _res_block(b, f"{p}.middle_block.0", ch, ch, emb)
    _spatial_transformer(b, f"{p}.middle_block.1", ch, cfg.middle_depth, cfg)
    _res_block(b, f"{p}.middle_block.2", ch, ch, emb)

    index = 0
    for level in range(last_level, -1, -1):
        out_c = cfg.channel_mult[level] * mc
        for i in range(cfg.num_res_blocks + 1):
            _res_block(b, f"{p}.output_blocks.{index}.0", ch + skip_channels.pop(), out_c, emb)
            ch = out_c
            sub = 1
            if cfg.depth_per_level[level]:
                _spatial_transformer(
                    b, f"{p}.output_blocks.{index}.1", ch, cfg.depth_per_level[level], cfg
                )
                sub = 2
            if level and i == cfg.num_res_blocks:
                b.conv(f"{p}.output_blocks.{index}.{sub}.conv", ch, ch, 3)
            index += 1

    b.norm(f"{p}.out.0", ch)
    b.conv(f"{p}.out.2", LATENT_CHANNELS, ch, 3)


# ---- VAE (ldm AutoencoderKL naming) -----------------------------------------------------------


def _vae_resnet(b: _Builder, p: str, in_c: int, out_c: int) -> None:
    b.norm(f"{p}.norm1", in_c)
    b.conv(f"{p}.conv1", out_c, in_c, 3)
    b.norm(f"{p}.norm2", out_c)
    b.conv(f"{p}.conv2", out_c, out_c, 3)
    if in_c != out_c:
        b.conv(f"{p}.nin_shortcut", out_c, in_c, 1)


def _vae_mid(b: _Builder, p: str, c: int) -> None:
    _vae_resnet(b, f"{p}.block_1", c, c)
    b.norm(f"{p}.attn_1.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        b.conv(f"{p}.attn_1.{name}", c, c, 1)
    _vae_resnet(b, f"{p}.block_2", c, c)


def _vae(b: _Builder, cfg: _VAEConfig) -> None:
    p = "first_stage_model"
    z = cfg.z_channels
    last = len(cfg.ch_mult) - 1

    b.conv(f"{p}.encoder.conv_in", cfg.ch, 3, 3)
    ch = cfg.ch
    for level, mult in enumerate(cfg.ch_mult):
        out_c = cfg.ch * mult
        for j in range(cfg.num_res_blocks):
            _vae_resnet(b, f"{p}.encoder.down.{level}.block.{j}", ch, out_c)
            ch = out_c
        if level != last:
            b.conv(f"{p}.encoder.down.{level}.downsample.conv", ch, ch, 3)
    _vae_mid(b, f"{p}.encoder.mid", ch)
    b.norm(f"{p}.encoder.norm_out", ch)
    b.conv(f"{p}.encoder.conv_out", 2 * z, ch, 3)  # mean and log-variance

    b.conv(f"{p}.quant_conv", 2 * z, 2 * z, 1)
    b.conv(f"{p}.post_quant_conv", z, z, 1)

    ch = cfg.ch * cfg.ch_mult[-1]
    b.conv(f"{p}.decoder.conv_in", ch, z, 3)
    _vae_mid(b, f"{p}.decoder.mid", ch)
    for level in range(last, -1, -1):
        out_c = cfg.ch * cfg.ch_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            _vae_resnet(b, f"{p}.decoder.up.{level}.block.{j}", ch, out_c)
            ch = out_c
        if level != 0:
            b.conv(f"{p}.decoder.up.{level}.upsample.conv", ch, ch, 3)
    b.norm(f"{p}.decoder.norm_out", ch)
    b.conv(f"{p}.decoder.conv_out", 3, ch, 3)


# ---- text encoders ------------------------------------------------------------------------------


def _clip_text(b: _Builder, prefix: str, cfg: _CLIPConfig) -> None:
    p = f"{prefix}.transformer.text_model"
    w = cfg.width
    b.add(f"{p}.embeddings.position_embedding.weight", TEXT_TOKENS, w)
    b.add_int(f"{p}.embeddings.position_ids", 1, TEXT_TOKENS)
    b.add(f"{p}.embeddings.token_embedding.weight", cfg.vocab, w)
    for i in range(cfg.layers):
        layer = f"{p}.encoder.layers.{i}"
        b.norm(f"{layer}.layer_norm1", w)
        b.norm(f"{layer}.layer_norm2", w)
        b.linear(f"{layer}.mlp.fc1", 4 * w, w)
        b.linear(f"{layer}.mlp.fc2", w, 4 * w)
        for proj in ("k_proj", "q_proj", "v_proj", "out_proj"):
            b.linear(f"{layer}.self_attn.{proj}", w, w)
    b.norm(f"{p}.final_layer_norm", w)


def _open_clip_text(b: _Builder, prefix: str, cfg: _OpenCLIPConfig) -> None:
    p = f"{prefix}.model"
    w = cfg.width
    b.norm(f"{p}.ln_final", w)
    b.add(f"{p}.logit_scale")
    b.add(f"{p}.positional_embedding", TEXT_TOKENS, w)
    b.add(f"{p}.text_projection", w, cfg.proj_dim)
    b.add(f"{p}.token_embedding.weight", cfg.vocab, w)
    for i in range(cfg.layers):
        block = f"{p}.transformer.resblocks.{i}"
        # open_clip keeps q, k and v in one packed projection.
        b.add(f"{block}.attn.in_proj_weight", 3 * w, w)
        b.add(f"{block}.attn.in_proj_bias", 3 * w)
        b.linear(f"{block}.attn.out_proj", w, w)
        b.norm(f"{block}.ln_1", w)
        b.norm(f"{block}.ln_2", w)
        b.linear(f"{block}.mlp.c_fc", 4 * w, w)
        b.linear(f"{block}.mlp.c_proj", w, 4 * w)


# ---- public -------------------------------------------------------------------------------------


def _check_divisor(width_divisor: int) -> int:
    if isinstance(width_divisor, bool) or not isinstance(width_divisor, int) or width_divisor < 1:
        raise BadParameterError(
            f"width_divisor must be a positive integer, got {width_divisor!r}; use 1 for real "
            "sizes or a power of two up to 64 for small demo models"
        )
    bad = [w for w in _DIVIDED_WIDTHS if w % width_divisor]
    if bad:
        raise BadParameterError(
            f"width_divisor={width_divisor} does not divide the width(s) {bad}; use a power of "
            "two up to 64"
        )
    return width_divisor


def _shrink_unet(cfg: _UNetConfig, k: int) -> _UNetConfig:
    adm = None
    if cfg.adm_in is not None:
        adm = (cfg.adm_in - _SDXL_SIZE_FEATURES) // k + _SDXL_SIZE_FEATURES // k
    return _UNetConfig(
        cfg.model_channels // k,
        cfg.channel_mult,
        cfg.num_res_blocks,
        cfg.depth_per_level,
        cfg.middle_depth,
        cfg.context_dim // k,
        cfg.linear_proj,
        adm,
    )


def _unet_config(arch: ArchSpec) -> _UNetConfig:
    configs = {SD1.name: _SD1_UNET, SD2.name: _SD2_UNET, SDXL.name: _SDXL_UNET}
    if arch.name not in configs:
        raise UnknownArchitectureError(
            f"no layout for architecture {arch.name!r}; layouts exist for {', '.join(configs)}"
        )
    return configs[arch.name]


def _in_channels(inpainting: bool) -> int:
    return INPAINT_CHANNELS if inpainting else LATENT_CHANNELS


def unet_layout(
    arch: ArchSpec | str, width_divisor: int = 1, *, inpainting: bool = False
) -> Layout:
    """Only the ``model.diffusion_model.*`` keys of ``full_layout`` (a U-Net-only file)."""
    spec = get_arch(arch)
    k = _check_divisor(width_divisor)
    b = _Builder()
    _unet(b, _shrink_unet(_unet_config(spec), k), _in_channels(inpainting))
    return b.layout


def full_layout(
    arch: ArchSpec | str, *, width_divisor: int = 1, inpainting: bool = False
) -> Layout:
    """Every key of a single-file checkpoint mapped to ``(shape, "float" | "int")``.

    U-Net first, then VAE, then the text encoder(s). No EMA, schedule buffers or marker keys:
    the released files differ in those, and callers add them when they need them.
    """
    spec = get_arch(arch)
    k = _check_divisor(width_divisor)
    b = _Builder()
    _unet(b, _shrink_unet(_unet_config(spec), k), _in_channels(inpainting))
    _vae(b, _VAEConfig(_VAE.ch // k, _VAE.ch_mult, _VAE.num_res_blocks, _VAE.z_channels))
    vocab = _VOCAB // k
    if spec.name == SDXL.name:
        clip_l = _CLIPConfig(_CLIP_L.width // k, _CLIP_L.layers, vocab)
        _clip_text(b, "conditioner.embedders.0", clip_l)
        g = _OPENCLIP_BIGG
        big_g = _OpenCLIPConfig(g.width // k, g.layers, vocab, g.proj_dim // k)
        _open_clip_text(b, "conditioner.embedders.1", big_g)
    elif spec.name == SD2.name:
        h = _OPENCLIP_H
        _open_clip_text(
            b, "cond_stage_model", _OpenCLIPConfig(h.width // k, h.layers, vocab, h.proj_dim // k)
        )
    else:
        _clip_text(b, "cond_stage_model", _CLIPConfig(_CLIP_L.width // k, _CLIP_L.layers, vocab))
    return b.layout
