"""Regenerates the key/shape lists in this folder. Not a test; run it by hand from the repository root:

    python tests/data/make_layouts.py SPEC_DIR

sd1 and sdxl are re-encoded from the architecture spec files (read from sd-mecha 1.1.8's ``sd1-ldm`` and
``sdxl-sgm`` model configs). sd2 has no such source, so it is assembled from parts that do not come
from ``lib_merge.arch.layouts`` (the code the tests check):

* U-Net: the module tree of ``lib_merge.testing.UNetModel`` (a mirror of ldm's openaimodel, itself
  checked against the SD1/SDXL lists) with the settings by which Stability's
  ``configs/stable-diffusion/v2-inference(-v).yaml`` differ from v1: ``context_dim: 1024``,
  ``use_linear_in_transformer: True`` (``num_head_channels: 64`` changes no shape);
* VAE: SD1's keys (``first_stage_config`` is the same in v1 and v2);
* text encoder: OpenCLIP ViT-H/14's text tower built from torch modules (width 1024, 24 layers,
  16 heads, MLP 4096, 77 tokens, 49408 tokens of vocabulary, a 1024x1024 ``text_projection`` and a
  scalar ``logit_scale``); ``attn`` is ``nn.MultiheadAttention`` as in open_clip, so its state-dict
  names are torch's own (``in_proj_weight``, ``out_proj.weight``).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNET = "model.diffusion_model."


def _write(name: str, source: str, keys: dict) -> None:
    ints = sorted(k for k, v in keys.items() if v.get("int"))
    data = {
        "source": source,
        "num_keys": len(keys),
        "num_params": sum(math.prod(v["shape"]) for v in keys.values()),
        "int_keys": ints,
        "shapes": {k: keys[k]["shape"] for k in sorted(keys)},
    }
    (HERE / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")


def _sd2_keys(sd1: dict) -> dict:
    import torch
    from torch import nn

    from lib_merge.testing import UNetModel, sd1_config

    keys: dict = {}
    with torch.device("meta"):
        unet = UNetModel(sd1_config(context_dim=1024, use_linear_in_transformer=True))
        width, layers, vocab, tokens = 1024, 24, 49408, 77
        block = nn.ModuleDict({
            "ln_1": nn.LayerNorm(width), "attn": nn.MultiheadAttention(width, 16), "ln_2": nn.LayerNorm(width),
            "mlp": nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)}),
        })
        text = nn.Module()
        text.token_embedding = nn.Embedding(vocab, width)
        text.positional_embedding = nn.Parameter(torch.empty(tokens, width))
        text.transformer = nn.Module()
        text.transformer.resblocks = nn.ModuleList(block for _ in range(1))
        text.ln_final = nn.LayerNorm(width)
        text.text_projection = nn.Parameter(torch.empty(width, width))
        text.logit_scale = nn.Parameter(torch.empty(()))
    for k, v in unet.state_dict().items():
        keys[UNET + k] = {"shape": list(v.shape)}
    for k, v in text.state_dict().items():
        if k.startswith("transformer.resblocks.0."):
            for i in range(layers):
                keys["cond_stage_model.model." + k.replace(".0.", f".{i}.", 1)] = {"shape": list(v.shape)}
        else:
            keys["cond_stage_model.model." + k] = {"shape": list(v.shape)}
    keys.update({k: v for k, v in sd1.items() if k.startswith("first_stage_model.")})
    return keys


def main(specs: Path) -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    loaded = {}
    for name in ("sd1", "sdxl"):
        ref = json.loads((specs / f"{name}.json").read_text())
        loaded[name] = ref["keys"]
        _write(name, ref["source"], ref["keys"])
    _write("sd2", "assembled by tests/data/make_layouts.py (see its docstring and README.md)", _sd2_keys(loaded["sd1"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
