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
    if recipe.loras and any(hashes):
        from .io.hashing import sha256_file

        recipe = recipe.replace(loras=tuple(dict(rel, sha256=sha256_file(full["path"]))
                                            for rel, full in zip(recipe.loras, plan.recipe.loras)))
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
        **prediction_metadata(plan.prediction),
    }


def prediction_metadata(prediction: str | None) -> dict[str, str]:
    """kohya's ``modelspec.prediction_type`` (epsilon / v) and ComfyUI's ``modelspec.predict_key``
    for the output's prediction type; nothing when it is unknown (an unmarked SD2 model)."""
    if prediction is None:
        return {}
    v = not prediction.startswith("eps")
    return {"modelspec.prediction_type": "v" if v else "epsilon",
            "modelspec.predict_key": "v_pred" if v and prediction != "edm-v" else ("edm_vpred" if v else "epsilon")}


def build_soup_metadata(pot, output: Path, dtype: str, scale: float) -> dict[str, str]:
    """Metadata of a soup export: a ``soup`` recipe over the ingredient files (each with its
    sha256; with ``scale`` ≠ 1 the base first, weighted so that the normalised weights give
    base + scale·(average − base)), so `merge --recipe OUT` re-runs it from the ingredients; plus
    the pot's own summary under ``lib_merge_soup``."""
    from .arch import detect_architecture
    from .recipe import Recipe

    ingredients = pot.ingredients
    total = pot.total_weight
    models = [i.path for i in ingredients]
    hashes = [i.sha256 for i in ingredients]
    weights = [scale * i.weight for i in ingredients]
    if scale != 1.0:
        base = pot.data["base"]
        models.insert(0, base["path"])
        hashes.insert(0, base["sha256"])
        weights.insert(0, (1.0 - scale) * total)
    recipe = Recipe(
        "soup", tuple(models), params={"model_weights": ",".join(repr(w) for w in weights)}, dtype=dtype,
        model_hashes=tuple(hashes),
    ).relative_to(output.parent)
    shapes = {k: tuple(shape) for k, shape, _, _ in pot.layout or []}
    info = detect_architecture(shapes, source=str(pot.folder))
    arch = MODELSPEC_ARCH.get(info.arch.name, info.arch.name) + ("/inpaint" if info.inpainting else "")
    a1111_recipe = {
        "type": "lib_merge soup",
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
        "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
        "interp_method": "soup",
        "multiplier": None,
        "save_as_half": dtype == "fp16",
        "custom_name": "",
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": info.inpainting,
        "is_instruct_pix2pix": False,
    }
    merge_models = {
        i.sha256: {"name": i.name, "legacy_hash": legacy_hash(i.path) if Path(i.path).exists() else None,
                   "sd_merge_recipe": None}
        for i in ingredients
    }
    summary = {
        "generation": pot.data["generation"],
        "total_weight": total,
        "scale": scale,
        "base": pot.data.get("base"),
        "ingredients": [{"name": i.name, "sha256": i.sha256, "weight": i.weight} for i in ingredients],
    }
    return {
        "format": "pt",
        METADATA_KEY: recipe.to_json(),
        "lib_merge_soup": json.dumps(summary, sort_keys=True),
        "sd_merge_recipe": json.dumps(a1111_recipe),
        "sd_merge_models": json.dumps(merge_models),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if info.arch.name == "sdxl" else "https://github.com/Stability-AI/stablediffusion",
    }


def _json_or_none(text: str | None):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
