"""A small CLIP-like text transformer whose parameter names are those of SD1's text encoder.

Under ``cond_stage_model.`` its state dict reads ``transformer.text_model.embeddings.*``,
``…encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``
and ``…final_layer_norm``, the names of HF ``CLIPTextModel`` that SD1 checkpoints carry, so
detection and the key→block table treat it as SD1's (all BASE). The computation is CLIP's too:
pre-norm blocks, causal self-attention, quick-GELU, and the U-Net is given every position of
the final-layer-normed hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    context_length: int = 16
    width: int = 64  # must equal the U-Net's cross-attention context_dim
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, w // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), QuickGELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self_attn = Attention(c.width, c.heads)
        self.layer_norm1 = nn.LayerNorm(c.width)
        self.mlp = MLP(c.width, c.width * c.mlp_ratio)
        self.layer_norm2 = nn.LayerNorm(c.width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(c.layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Embeddings(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.context_length, c.width)
        # Saved like SD1's int64 position_ids, which merges copy from A instead of averaging.
        self.register_buffer("position_ids", torch.arange(c.context_length).unsqueeze(0), persistent=True)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding(self.position_ids[:, : ids.shape[1]])


class TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embeddings, self.encoder, self.final_layer_norm = Embeddings(c), Encoder(c), nn.LayerNorm(c.width)

    def forward(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class _Transformer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.text_model = TextModel(c)


class ToyTextEncoder(nn.Module):
    """``forward(ids (B, T) int64) -> context (B, T, width)``; the module sits at ``cond_stage_model``."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.transformer = _Transformer(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(f"token ids of shape {tuple(ids.shape)}: expected (batch, ≤{self.config.context_length})")
        return self.transformer.text_model(ids)
