"""The recipe: an immutable, versioned description of a merge, serialised as JSON and embedded
in every output so the merge can be reproduced (`merge --recipe OUT.safetensors`).

Version 1 (stable):
    {"version": 1, "method": "weighted_sum", "models": ["a.safetensors", "b.safetensors"],
     "alpha": 0.5, "weights": null, "params": {}, "seed": 0, "dtype": "fp16", "blocks": "supermerger"}
Optional fields: "beta", "beta_weights", "vae", "model_hashes" (sha256 per model, "" for virtual
inputs), "loras" (baked after the method: [{"path", "sha256", "strength", "weights"}, …]),
"prediction" (the model whose prediction-type markers the output keeps when the inputs disagree:
"A", "B", …), "fp8_all" (fp8 for text encoders and VAE too). Each is written only when set, so a
recipe without them is byte for byte what it was. Relative model paths are relative to the folder of the recipe (or merged file).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .arch.keys import DEFAULT_POLICY
from .errors import RecipeError

RECIPE_VERSION = 1
METADATA_KEY = "lib_merge_recipe"
# The key->block policy a version-1 recipe without "blocks" was written with. Pinned here rather
# than taken from arch.DEFAULT_POLICY so that a later change of the default cannot change what an
# old recipe reproduces.
V1_DEFAULT_BLOCKS = "supermerger"
_FIELDS = {
    "version", "method", "models", "alpha", "beta", "weights", "beta_weights", "params",
    "seed", "dtype", "blocks", "vae", "model_hashes", "loras", "prediction", "fp8_all",
}


@dataclass(frozen=True)
class Recipe:
    method: str
    models: tuple[str, ...]
    alpha: float | None = None
    beta: float | None = None
    weights: Any = None  # per-block α: list, preset name or override string
    beta_weights: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "fp16"
    blocks: str = DEFAULT_POLICY
    vae: str | None = None
    model_hashes: tuple[str, ...] = ()
    loras: tuple[Mapping[str, Any], ...] = ()
    prediction: str | None = None
    fp8_all: bool = False
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "method": self.method,
            "models": list(self.models),
            "alpha": self.alpha,
            "weights": _jsonable(self.weights),
            "params": dict(self.params),
            "seed": self.seed,
            "dtype": self.dtype,
            "blocks": self.blocks,
        }
        if self.beta is not None:
            data["beta"] = self.beta
        if self.beta_weights is not None:
            data["beta_weights"] = _jsonable(self.beta_weights)
        if self.vae is not None:
            data["vae"] = self.vae
        if self.model_hashes:
            data["model_hashes"] = list(self.model_hashes)
        if self.loras:
            data["loras"] = [dict(lora) for lora in self.loras]
        if self.prediction is not None:
            data["prediction"] = self.prediction
        if self.fp8_all:
            data["fp8_all"] = True
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes: Any) -> "Recipe":
        from dataclasses import replace

        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: a recipe must be a JSON object")
        version = data.get("version")
        if version != RECIPE_VERSION:
            raise RecipeError(
                f"{source}: recipe version {version!r} is not supported (this lib_merge reads version {RECIPE_VERSION})"
            )
        unknown = set(data) - _FIELDS
        if unknown:
            raise RecipeError(f"{source}: unknown recipe field(s) {', '.join(sorted(unknown))}")
        for required in ("method", "models"):
            if required not in data:
                raise RecipeError(f"{source}: recipe needs a {required!r} field")
        models = data["models"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise RecipeError(f"{source}: 'models' must be a non-empty list of paths")
        params = data.get("params") or {}
        if not isinstance(params, Mapping):
            raise RecipeError(f"{source}: 'params' must be an object of NAME: value")
        try:
            return cls(
                method=str(data["method"]),
                models=tuple(models),
                alpha=None if data.get("alpha") is None else float(data["alpha"]),
                beta=None if data.get("beta") is None else float(data["beta"]),
                weights=data.get("weights"),
                beta_weights=data.get("beta_weights"),
                params=dict(params),
                seed=int(data.get("seed", 0)),
                dtype=str(data.get("dtype", "fp16")),
                blocks=str(data.get("blocks", V1_DEFAULT_BLOCKS)),
                vae=data.get("vae"),
                model_hashes=tuple(data.get("model_hashes") or ()),
                loras=_loras(data.get("loras"), source),
                prediction=None if data.get("prediction") is None else str(data["prediction"]),
                fp8_all=bool(data.get("fp8_all", False)),
            )
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{source}: bad recipe value ({exc})") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "recipe") -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    def with_base_dir(self, base: Path, models_dir: Path | None = None) -> "Recipe":
        """Resolve relative model (and VAE) paths against ``base``; virtual inputs are kept. With
        ``models_dir`` (the recipe moved away from its models), a recorded name found there —
        as recorded, or by its file name alone — wins over the recorded place."""
        from .inputs import parse_model_ref

        def resolve(ref: str) -> str:
            if not isinstance(parse_model_ref(ref), str):
                return ref
            if models_dir is not None:
                name = re.split(r"[\\/]", ref)[-1]  # recorded on Windows or POSIX alike
                for candidate in ([] if os.path.isabs(ref) else [models_dir / ref]) + [models_dir / name]:
                    if candidate.is_file():
                        return str(candidate)
            return ref if os.path.isabs(ref) else str(base / ref)

        return self.replace(
            models=tuple(resolve(m) for m in self.models),
            vae=resolve(self.vae) if self.vae else None,
            loras=tuple(dict(lora, path=resolve(lora["path"])) for lora in self.loras),
        )

    def relative_to(self, base: Path) -> "Recipe":
        """Store model paths relative to ``base`` (the output's folder) where possible, so a
        merged file and its inputs can move together."""
        from .inputs import parse_model_ref

        def rel(ref: str) -> str:
            if not isinstance(parse_model_ref(ref), str):
                return ref
            try:
                return os.path.relpath(os.path.abspath(ref), os.path.abspath(base))
            except ValueError:  # another drive on Windows
                return os.path.abspath(ref)

        return self.replace(models=tuple(rel(m) for m in self.models), vae=rel(self.vae) if self.vae else None,
                            loras=tuple(dict(lora, path=rel(lora["path"])) for lora in self.loras))


def load_recipe(path: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None) -> Recipe:
    """Read a recipe JSON file, or the recipe embedded in a checkpoint merged by this tool; model
    paths come back resolved against the file's folder (or found in ``models_dir``)."""
    p = Path(path)
    folder = Path(models_dir) if models_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise RecipeError(f"--models-dir {folder}: not a folder")
    if not p.exists():
        raise RecipeError(f"{p}: recipe file not found")
    if p.suffix.lower() in (".safetensors", ".sft"):
        from .io.reader import SafetensorsReader

        with SafetensorsReader(p) as reader:
            text = reader.metadata.get(METADATA_KEY)
        if not text:
            raise RecipeError(
                f"{p}: has no {METADATA_KEY!r} metadata — it was not merged by lib_merge (A1111's "
                "sd_merge_recipe lacks the block weights needed to reproduce it)"
            )
        return Recipe.from_json(text, source=str(p)).with_base_dir(p.parent, folder)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read recipe ({exc})") from None
    return Recipe.from_json(text, source=str(p)).with_base_dir(p.parent, folder)


def _loras(value: Any, source: str) -> tuple[dict[str, Any], ...]:
    if not value:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, Mapping) and isinstance(v.get("path"), str) for v in value):
        raise RecipeError(f"{source}: 'loras' must be a list of objects with a 'path'")
    out = []
    for v in value:
        unknown = set(v) - {"path", "sha256", "strength", "weights"}
        if unknown:
            raise RecipeError(f"{source}: unknown LoRA field(s) {', '.join(sorted(unknown))}")
        out.append({"path": v["path"], "sha256": str(v.get("sha256", "")), "strength": float(v.get("strength", 1.0)),
                    "weights": v.get("weights")})
    return tuple(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
