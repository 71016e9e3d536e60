"""Output metadata: our versioned recipe, plus A1111's ``sd_merge_recipe`` / ``sd_merge_models``
keys so the WebUI's own merge-history view shows where the model came from, plus modelspec
architecture keys. Nothing run-specific (dates, output name) goes in, so re-running a recipe
gives a byte-identical file."""
from __future__ import annotations

import json
from pathlib import Path

from .blocks import format_block_weights
from .inputs import VirtualInput
from .io.hashing import legacy_hash
from .io.reader import CheckpointReader
from .plan import MergePlan
from .recipe import METADATA_KEY

MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def build_metadata(plan: MergePlan, hashes: list[str], output: Path) -> dict[str, str]:
    recipe = plan.recipe.relative_to(output.parent).replace(model_hashes=tuple(hashes) if any(hashes) else ())
    inpainting = plan.info.inpainting
    arch = MODELSPEC_ARCH.get(plan.info.arch.name, plan.info.arch.name)
    if inpainting:
        arch += "/inpaint"
    block_weights = {
        name: format_block_weights(values, plan.info.arch) for name, values in plan.block_values.items()
    }
    a1111_recipe = {
        "type": "lib_merge",
        "primary_model_hash": hashes[0] or None,
        "secondary_model_hash": (hashes[1] or None) if len(hashes) > 1 else None,
        "tertiary_model_hash": (hashes[2] or None) if len(hashes) > 2 else None,
        "interp_method": plan.method.name,
        "multiplier": plan.recipe.alpha,
        "save_as_half": plan.recipe.dtype == "fp16",
        "custom_name": "",
        "config_source": 0,
        "bake_in_vae": Path(plan.recipe.vae).name if plan.recipe.vae else "None",
        "discard_weights": "",
        "is_inpainting": inpainting,
        "is_instruct_pix2pix": False,
        "block_weights": block_weights,
    }
    merge_models: dict[str, dict] = {}
    for reader, digest in zip(plan.inputs, hashes):
        if isinstance(reader, VirtualInput) or not digest:
            continue
        assert isinstance(reader, CheckpointReader)
        merge_models[digest] = {
            "name": reader.path.stem,
            "legacy_hash": legacy_hash(reader.path),
            "sd_merge_recipe": _json_or_none(reader.metadata.get("sd_merge_recipe")),
        }
        merge_models.update(_json_or_none(reader.metadata.get("sd_merge_models")) or {})
    return {
        "format": "pt",
        METADATA_KEY: recipe.to_json(),
        "sd_merge_recipe": json.dumps(a1111_recipe),
        "sd_merge_models": json.dumps(merge_models),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if plan.info.arch.name == "sdxl" else "https://github.com/Stability-AI/stablediffusion",
    }


def _json_or_none(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
