"""A model family that draws: toy text-to-image models in the real SD1 checkpoint layout, small
enough to train on a CPU, so merges, block weights, soups and the board can be judged by what
the merged model draws rather than by weight statistics alone.

Built so far:

* ``data``: a seeded generator of 32×32 (or 16×16) RGB images of shapes with captions from a
  small grammar (shape, colour, size, position, background texture, and a style family of
  palette / outline / shading for aesthetic shards); every image carries its attributes, and a
  held-out split of (shape, colour, texture) combinations that training never draws.
* ``tokenizer``: word-level, over the grammar's vocabulary; the empty prompt is valid.
* ``text_encoder``: a small CLIP-like transformer with SD1's text-encoder key names.
* ``model``: U-Net (ldm layout, SD1 structure, reduced width, pixel space) + text encoder as
  one module whose state dict is an SD1-layout checkpoint; save/load through lib_merge's writer.

Planned (issue 11, items 3-7, not built yet):

* training: ε-prediction DDPM training on CPU from one shared base, then fine-tunes on data
  shards (by shape, colour or style) to make a family of related checkpoints, as Diffusion Soup
  does;
* sampling: a deterministic sampler (the project's k-diffusion-style samplers over the SD
  discrete schedule) with classifier-free guidance against the empty prompt;
* metrics: a small attribute classifier trained on the generator's ground truth, scoring how
  often a sample shows the attributes its prompt asked for, on training and held-out prompts;
* experiments: merges, block weights and soup add/remove judged by those scores, against the
  shard models and a model trained on the union.
"""
from __future__ import annotations

from .data import Attributes, Batch, make_batch, parse_caption, render, vocabulary
from .model import ToyConfig, ToyModel, build_toy_model, load_toy_checkpoint, save_toy_checkpoint
from .text_encoder import TextConfig, ToyTextEncoder
from .tokenizer import WordTokenizer

__all__ = [
    "Attributes", "Batch", "TextConfig", "ToyConfig", "ToyModel", "ToyTextEncoder", "WordTokenizer",
    "build_toy_model", "load_toy_checkpoint", "make_batch", "parse_caption", "render",
    "save_toy_checkpoint", "vocabulary",
]
