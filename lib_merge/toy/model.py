"""The toy model in the SD1 checkpoint layout: build, save through the streaming writer, load.

``ToyModel``'s own ``state_dict()`` *is* the checkpoint: the U-Net sits at
``model.diffusion_model`` (ldm's ``UNetModel`` at reduced width with SD1's structure: 12 input
blocks, middle, 12 output blocks, 1×1-conv transformer projections) and the text encoder at
``cond_stage_model``, so ``lib_merge`` detects a saved file as SD1 and maps it onto the same 26
blocks as a real SD1 checkpoint.

Pixel space, not latent: 32×32 RGB is small enough for the U-Net to work on directly, and a VAE
would be one more trained component whose errors a merge experiment would have to separate from
the merge's. The file therefore has no ``first_stage_model.*`` keys and a 3-channel ``conv_in``,
which detection reports in a note ("only merges with models of the same input width").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..io.reader import open_checkpoint
from ..io.writer import SafetensorsWriter
from ..testing.unet import UNetConfig, UNetModel, sd1_config
from .text_encoder import TextConfig, ToyTextEncoder
from .tokenizer import DEFAULT_CONTEXT_LENGTH, WordTokenizer

METADATA_KEY = "mergeboard.toy.config"
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
_TOY_HEADS = 4  # per text-encoder attention layer; not visible in tensor shapes
# One head per U-Net attention layer: at 16-32 channels, four heads of 4-8 dims made torch's CPU
# attention kernel 46 % of a forward; one head runs a training step 2.4× faster.
_UNET_HEADS = 1
# The size the trained family works at (toy.family.PLANS): what a merge output without our
# metadata is sampled at unless the caller says otherwise.
FAMILY_RESOLUTION = 16
_TOY_GROUPS = 8  # GroupNorm groups; SD1's 32 would leave one channel a group at 32 channels


def toy_unet_config(model_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 4, 4), context_dim: int = 64, **overrides) -> UNetConfig:
    """SD1's structure (4 levels × 2 res blocks, attention at the first three levels, conv
    projections) at a tenth of its width (32/64/128/128 channels), on RGB pixels.

    The multipliers are SD1's own (1, 2, 4, 4), not a flatter (1, 2, 2, 2): the width change
    into level 2 is what gives ``input_blocks.7.0`` its ``skip_connection``, so only SD1's
    multipliers reproduce SD1's exact key set. The cost is small: the 32×32 level dominates the
    compute, and the wider 8×8 and 4×4 levels add parameters, not time."""
    base = sd1_config(
        model_channels=model_channels, channel_mult=tuple(channel_mult), context_dim=context_dim,
        in_channels=3, out_channels=3, num_heads=_UNET_HEADS, norm_groups=_TOY_GROUPS,
    )
    return replace(base, **overrides)


@dataclass(frozen=True)
class ToyConfig:
    unet: UNetConfig = field(default_factory=toy_unet_config)
    text: TextConfig = field(default_factory=lambda: TextConfig(
        vocab_size=WordTokenizer().vocab_size, context_length=DEFAULT_CONTEXT_LENGTH, width=64, heads=_TOY_HEADS))
    resolution: int = 32

    def __post_init__(self):
        if self.text.width != self.unet.context_dim:
            raise ValueError(
                f"text width {self.text.width} must equal the U-Net's context_dim {self.unet.context_dim}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ToyConfig":
        raw = json.loads(text)
        unet = dict(raw["unet"])
        for name in ("channel_mult", "attention_resolutions", "transformer_depth"):
            unet[name] = tuple(unet[name])
        return cls(unet=UNetConfig(**unet), text=TextConfig(**raw["text"]), resolution=int(raw["resolution"]))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], resolution: int = 32) -> "ToyConfig":
        """The config of a toy file that lost its metadata (a merge output), from tensor shapes;
        heads and norm groups are the family's constants."""
        u = UNET_PREFIX
        try:
            mc = int(shapes[u + "time_embed.0.weight"][1])
            # SD1 structure: the first res block of level L is input block 1 + 3L.
            mult = tuple(int(shapes[f"{u}input_blocks.{1 + 3 * level}.0.in_layers.2.weight"][0]) // mc for level in range(4))
            ctx = int(shapes[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1])
            conv_in = shapes[u + "input_blocks.0.0.weight"]
            out = shapes[u + "out.2.weight"]
            t = TEXT_PREFIX + "transformer.text_model."
            vocab, width = (int(d) for d in shapes[t + "embeddings.token_embedding.weight"])
            context_length = int(shapes[t + "embeddings.position_embedding.weight"][0])
            hidden = int(shapes[t + "encoder.layers.0.mlp.fc1.weight"][0])
        except KeyError as exc:
            raise ValueError(f"not a toy SD1 checkpoint: no {exc.args[0]!r}") from None
        layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(t) + r"encoder\.layers\.(\d+)\.", k))}
        unet = toy_unet_config(mc, mult, ctx, in_channels=int(conv_in[1]), out_channels=int(out[0]))
        text = TextConfig(vocab_size=vocab, context_length=context_length, width=width,
                          layers=len(layer_ids), heads=_TOY_HEADS, mlp_ratio=hidden // width)
        return cls(unet=unet, text=text, resolution=resolution)


class _Wrapper(nn.Module):
    """ldm's ``LatentDiffusion.model`` (DiffusionWrapper): holds the U-Net as ``diffusion_model``."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig | None = None):
        super().__init__()
        self.config = config or ToyConfig()
        self.model = _Wrapper(UNetModel(self.config.unet))
        self.cond_stage_model = ToyTextEncoder(self.config.text)
        self.tokenizer = WordTokenizer(context_length=self.config.text.context_length)
        if self.tokenizer.vocab_size != self.config.text.vocab_size:
            raise ValueError(
                f"text encoder vocab {self.config.text.vocab_size} != tokenizer vocab {self.tokenizer.vocab_size}"
            )

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, context_length, width) cross-attention context; "" is a valid prompt."""
        return self.cond_stage_model(self.tokenizer.encode_batch(prompts))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """ε prediction for pixel-space images ``x`` (B, 3, R, R) at integer ``timesteps``."""
        return self.unet(x, timesteps, context=self.encode_prompts(prompts))


def build_toy_model(seed: int = 0, config: ToyConfig | None = None) -> ToyModel:
    """A seeded, randomly initialised toy model in eval mode; the global RNG is left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ToyModel(config).eval()
    finally:
        torch.random.set_rng_state(state)


def save_toy_checkpoint(
    model: ToyModel, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None, overwrite: bool = False,
) -> Path:
    """Write ``model`` as a single-file SD1-layout checkpoint through the streaming writer
    (atomic: a failure leaves no file under ``path``). Integer buffers keep their dtype."""
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    cast = {k: v if not v.is_floating_point() else v.to(dtype) for k, v in tensors.items()}
    meta = {METADATA_KEY: model.config.to_json(), **(metadata or {})}
    writer = SafetensorsWriter(path, [(k, tuple(v.shape), v.dtype) for k, v in cast.items()], meta, overwrite=overwrite)
    try:
        for key, t in cast.items():
            writer.write(key, t.contiguous())
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def load_toy_checkpoint(path: str | os.PathLike[str], *, resolution: int | None = None) -> ToyModel:
    """A ``ToyModel`` (fp32, eval) from a toy file or any merge of toy files: the config comes
    from the file's metadata when it has ours, else from its tensor shapes. Shapes do not say the
    image size a model was trained at: ``resolution`` gives it for such a file (a merge output;
    default: the trained family's, ``FAMILY_RESOLUTION``) and overrides the metadata's."""
    with open_checkpoint(path) as reader:
        text = (reader.metadata or {}).get(METADATA_KEY)
        try:
            config = ToyConfig.from_json(text) if text else ToyConfig.from_shapes(reader.shapes(), FAMILY_RESOLUTION)
            if resolution is not None:
                config = replace(config, resolution=int(resolution))
            model = ToyModel(config)
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            # A real SD1 file gets this far: its widths fit no toy U-Net or tokenizer.
            raise ValueError(f"{path}: not a toy checkpoint ({exc})") from None
        expected = model.state_dict()
        missing = sorted(set(expected) - set(reader.keys()))
        if missing:
            raise ValueError(f"{path}: not a complete toy checkpoint; missing {len(missing)} keys, e.g. {missing[0]!r}")
        load_checked_state(model, reader, path, "the toy config")
    return model.eval()


def load_checked_state(module: nn.Module, reader, path, config_name: str) -> None:
    """Fill ``module`` from an open checkpoint, key by key, each tensor's shape checked against
    the module's (a mismatch names the key and ``config_name``) and cast to its dtype."""
    state = {}
    for key, ref in module.state_dict().items():
        t = reader.get(key)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, {config_name} expects {tuple(ref.shape)}")
        state[key] = t.to(ref.dtype)
    module.load_state_dict(state, strict=True)
