"""A model family that draws: toy text-to-image models in the real SD1 checkpoint layout, small
enough to train on a CPU, so merges, block weights, soups and the board can be judged by what
the merged model draws rather than by weight statistics alone.

Modules:

* ``data`` / ``shards``: a seeded generator of small RGB images with captions from a small
  grammar, every image carrying its attributes, a held-out split of (shape, colour, texture)
  combinations training never draws, and the domain (shape family) and aesthetic (palette)
  shards of the Diffusion Soup comparison.
* ``tokenizer``, ``text_encoder``, ``model``: word-level tokenizer, a small CLIP-like text
  encoder with SD1's key names, and the U-Net (ldm layout, SD1 structure, reduced width, pixel
  space) as one module whose state dict is an SD1-layout checkpoint.
* ``train`` / ``family``: deterministic ε-prediction training; the base, shard fine-tunes and
  paragon with equal compute (``python -m lib_merge toy train``).
* ``sampling``: samplers through the project's guidance stack (the WebUI adapters' path).
* ``classifier`` / ``metrics`` / ``evaluate`` / ``evidence``: the attribute classifier, the
  analogue metrics (adherence, Fréchet distance, untitled yield) and ``toy evidence``.
* ``png`` / ``demo_grid``: PNG grids, the demo's picture from the shipped ``pretrained`` models.
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
