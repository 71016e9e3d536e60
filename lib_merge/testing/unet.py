"""A plain-torch U-Net with the exact module and state-dict layout of ldm's ``openaimodel.UNetModel``.

Used by tests and benchmarks (guidance hooks, live merge preview) where the real SD code is not
installed. Module names and parameter shapes match SD1.x (ldm) and SDXL (sgm) checkpoints under
``model.diffusion_model.``; tiny configs keep the same structure at a fraction of the size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

# Re-exported: host stand-ins import the schedule from here.
from .schedules import karras_sigmas, sd_discrete_sigmas  # noqa: F401


@dataclass(frozen=True)
class UNetConfig:
    """The ldm ``UNetModel`` hyper-parameters this layout depends on."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get attention
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 1
    num_heads: int = 8  # used when num_head_channels == -1
    num_head_channels: int = -1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL's label_emb input ("sequential" num_classes)
    norm_groups: int = 32

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


def sd1_config(model_channels: int = 320, **overrides) -> UNetConfig:
    """SD1.x layout; the defaults are the full-size SD1.5 U-Net."""
    return replace(UNetConfig(model_channels=model_channels), **overrides)


def sdxl_config(model_channels: int = 320, **overrides) -> UNetConfig:
    """SDXL base layout; the defaults are the full-size SDXL U-Net."""
    base = UNetConfig(
        model_channels=model_channels,
        channel_mult=(1, 2, 4),
        attention_resolutions=(4, 2),
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        num_head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    )
    return replace(base, **overrides)


def tiny_sd1_config(**overrides) -> UNetConfig:
    """SD1-flavoured tiny U-Net: conv projections, heads by count, no attention at the deepest level (like SD1)."""
    base = sd1_config(
        model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(1, 2),
        transformer_depth=(1, 1, 1), transformer_depth_middle=1, num_heads=2, context_dim=64,
    )
    return replace(base, **overrides)


def tiny_sdxl_config(**overrides) -> UNetConfig:
    """SDXL-flavoured tiny U-Net: linear projections, 16-dim heads, depth 0/1/2 per level, ADM vector."""
    base = sdxl_config(
        model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(2, 4),
        transformer_depth=(0, 1, 2), transformer_depth_middle=2, num_head_channels=16, context_dim=64,
        adm_in_channels=96,
    )
    return replace(base, **overrides)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] with geometric frequencies (ldm ``timestep_embedding``; Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = q.shape[0], self.heads
        q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[-1] * h))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.in_channels, self.use_linear = channels, use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context=None):
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to ResBlocks and the context to transformers (ldm)."""

    def forward(self, x, emb=None, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm ``openaimodel.UNetModel`` layout: ``forward(x, timesteps, context, y=None)`` returns ε."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = config
        self.config = c
        self.model_channels = c.model_channels
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        ted = c.model_channels * 4
        g = c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if c.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, c.context_dim, c.use_linear_in_transformer, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        skip_channels = [c.model_channels]
        ch, ds = c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * c.model_channels, g)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions and c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch, g), transformer(ch, c.transformer_depth_middle), ResBlock(ch, ted, ch, g)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, c.model_channels * mult, g)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions and c.transformer_depth[level] > 0:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None, **_kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this U-Net has an ADM input (SDXL label_emb): pass y")
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context)
        return self.out(h)


def make_tiny_unet(flavour: str = "sd1", seed: int = 0, **overrides) -> UNetModel:
    """A seeded, eval-mode tiny U-Net of the ``"sd1"`` or ``"sdxl"`` flavour."""
    configs = {"sd1": tiny_sd1_config, "sdxl": tiny_sdxl_config}
    if flavour not in configs:
        raise ValueError(f"flavour={flavour!r}: choose sd1 or sdxl")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = UNetModel(configs[flavour](**overrides)).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def random_conditioning(config: UNetConfig, rows: int, tokens: int = 8, *, seed: int = 0):
    """Random text conditioning for ``rows`` rows: a context tensor, or SDXL's {crossattn, vector} dict."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(rows, tokens, config.context_dim, generator=g)
    if config.adm_in_channels is None:
        return context
    return {"crossattn": context, "vector": torch.randn(rows, config.adm_in_channels, generator=g)}
