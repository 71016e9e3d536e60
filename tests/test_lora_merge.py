"""lora-merge: concatenation bakes to exactly Σρᵢ·bake(LoRAᵢ); re-compression to rank R equals the
SVD of the summed delta; types that read the weight are refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_merge.arch import SD1
from lib_merge.errors import BadParameterError
from lib_merge.io.reader import open_checkpoint
from lib_merge.lora.bake import apply_patches
from lib_merge.lora.formats import LoraFile
from lib_merge.lora.merge import merge_loras, parse_weighted
from lib_merge.lora.patches import LoraSpec, bind
from lib_merge.lora.synthetic import synthetic_lora


def _baked(ckpt, loras):
    with open_checkpoint(ckpt) as reader:
        files = [(LoraFile(p), LoraSpec(str(p), w)) for p, w in loras]
        binding = bind(files, reader.shapes(), SD1, "supermerger")
        return {k: apply_patches(reader.get(k).float().clone(), p) for k, p in binding.patches.items()}, reader


def test_concat_equals_sum_of_bakes(models, tmp_path):
    with open_checkpoint(models.sd1_a) as r:
        shapes = r.shapes()
    save_file(synthetic_lora(shapes, "sd1", rank=2, seed=1), str(tmp_path / "l1.safetensors"))
    save_file(synthetic_lora(shapes, "sd1", rank=3, seed=2, text=False), str(tmp_path / "l2.safetensors"))
    out = tmp_path / "m.safetensors"
    report = merge_loras([(str(tmp_path / "l1.safetensors"), 0.6), (str(tmp_path / "l2.safetensors"), -0.3)], out,
                         dtype=torch.float32)
    assert report.retained == 1.0 and max(report.ranks) == 5
    merged, _ = _baked(models.sd1_a, [(out, 1.0)])
    separate, _ = _baked(models.sd1_a, [(tmp_path / "l1.safetensors", 0.6), (tmp_path / "l2.safetensors", -0.3)])
    assert merged.keys() == separate.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], separate[key], rtol=1e-5, atol=1e-6)


def test_rank_recompression_is_svd_of_sum(models, tmp_path):
    with open_checkpoint(models.sd1_a) as r:
        shapes = r.shapes()
    save_file(synthetic_lora(shapes, "sd1", kind="loha", rank=2, seed=3, text=False), str(tmp_path / "h.safetensors"))
    save_file(synthetic_lora(shapes, "sd1", rank=2, seed=4, text=False), str(tmp_path / "l.safetensors"))
    out = tmp_path / "r.safetensors"
    report = merge_loras([(str(tmp_path / "h.safetensors"), 1.0), (str(tmp_path / "l.safetensors"), 0.5)], out, rank=3,
                         dtype=torch.float32)
    assert max(report.ranks) <= 3 and 0 < report.retained < 1
    merged, reader = _baked(models.sd1_a, [(out, 1.0)])
    with open_checkpoint(models.sd1_a) as r:
        separate, _ = _baked(models.sd1_a, [(tmp_path / "h.safetensors", 1.0), (tmp_path / "l.safetensors", 0.5)])
        key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
        w = r.get(key).float()
    want = separate[key] - w
    s = torch.linalg.svdvals(want)
    got = merged[key] - w
    # the best rank-3 approximation: its error is exactly the discarded singular energy
    assert abs(float(torch.linalg.norm(want - got)) ** 2 - float((s[3:] ** 2).sum())) < 1e-4 * float((s ** 2).sum())


def test_refusals_and_weighted_refs(tmp_path):
    assert parse_weighted("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_weighted("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(3, 2),
               "lora_unet_x.dora_scale": torch.ones(3, 1)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(BadParameterError, match="DoRA"):
        merge_loras([(str(tmp_path / "d.safetensors"), 1.0)], tmp_path / "o.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.ones(3, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 4),
               "lora_unet_x.hada_w2_a": torch.ones(3, 2), "lora_unet_x.hada_w2_b": torch.ones(2, 4)},
              str(tmp_path / "h.safetensors"))
    with pytest.raises(BadParameterError, match="--rank"):
        merge_loras([(str(tmp_path / "h.safetensors"), 1.0)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
