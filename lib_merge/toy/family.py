"""Train the toy family the Diffusion Soup comparison needs, into one folder.

From one base pretrained on the whole training split, each shard of the domain family (shape
families) and of the aesthetic family (palettes) gets its own fine-tune, and a *paragon* is
fine-tuned from the same base on the union with the same compute (optimizer steps × batch) as
one family's shard models together — the paper's comparison (arXiv 2406.08431 §4). Both
families have three shards of equal steps, so one paragon matches both. Every file goes
through the project's streaming writer; a stage whose file already holds the same training
spec is kept, so an interrupted run picks up where it stopped.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional

from ..io.hashing import sha256_file
from ..io.reader import open_checkpoint
from .model import ToyConfig, build_toy_model, load_toy_checkpoint, save_toy_checkpoint, toy_unet_config
from .shards import SHARD_FAMILIES, Shard
from .train import TrainConfig, train

SPEC_KEY = "mergeboard.toy.train"
MANIFEST = "toy-family.json"


@dataclass(frozen=True)
class FamilyPlan:
    resolution: int
    model_channels: int
    channel_mult: tuple
    base_steps: int
    shard_steps: int
    batch: int
    base_lr: float
    finetune_lr: float
    seed: int = 0

    def model_config(self) -> ToyConfig:
        return ToyConfig(unet=toy_unet_config(self.model_channels, self.channel_mult), resolution=self.resolution)

    def base(self) -> TrainConfig:
        return TrainConfig(steps=self.base_steps, batch=self.batch, lr=self.base_lr, seed=self.seed)

    def finetune(self, steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch=self.batch, lr=self.finetune_lr, seed=self.seed, warmup=20)


# 16×16 because a 32×32 step costs 6× as much on this CPU (the 1024-token attention of level 0)
# and the full evidence run has 90 minutes; (1, 2, 3, 3) keeps SD1's key set (the width change
# into level 2) at 1.5 M parameters, so two shipped fp16 models fit in 8 MB.
PLANS: Dict[str, FamilyPlan] = {
    "full": FamilyPlan(resolution=16, model_channels=16, channel_mult=(1, 2, 3, 3), base_steps=3000,
                       shard_steps=200, batch=32, base_lr=1e-3, finetune_lr=3e-4),
    "quick": FamilyPlan(resolution=16, model_channels=16, channel_mult=(1, 2, 3, 3), base_steps=40,
                        shard_steps=6, batch=8, base_lr=1e-3, finetune_lr=3e-4),
}


def stage_files(plan: FamilyPlan) -> Dict[str, Optional[Shard]]:
    """File stem → shard of every model the family holds (base and paragon: None)."""
    out: Dict[str, Optional[Shard]] = {"base": None}
    for family, shards in SHARD_FAMILIES.items():
        for shard in shards:
            out[f"{family}-{shard.name}"] = shard
    out["paragon"] = None
    return out


def _spec(plan: FamilyPlan, stage: str, config: TrainConfig, parent: Optional[str]) -> dict:
    """What a stage's weights depend on: the model shape, the data seed, its own training and the
    file it starts from (a fine-tune of another base is another model). Not the other stages'
    steps: changing the fine-tunes keeps the base."""
    return {"model": [plan.resolution, plan.model_channels, list(plan.channel_mult)], "seed": plan.seed,
            "stage": stage, "train": config.as_dict(), "parent": parent}


def _stored_spec(text: Optional[str]) -> Optional[dict]:
    try:
        raw = json.loads(text)
    except (TypeError, ValueError):
        return None
    if "plan" in raw:  # first format: the whole plan was recorded (a base stage: no parent)
        p = raw["plan"]
        return {"model": [p["resolution"], p["model_channels"], list(p["channel_mult"])], "seed": p["seed"],
                "stage": raw["stage"], "train": raw["train"], "parent": None}
    return raw


def _already_trained(path: Path, spec: dict) -> bool:
    if not path.exists():
        return False
    try:
        with open_checkpoint(path) as reader:
            return _stored_spec((reader.metadata or {}).get(SPEC_KEY)) == spec
    except Exception:  # a damaged or foreign file is retrained (the writer replaces it atomically)
        return False


def train_family(out_dir: Path, plan: FamilyPlan, *, threads: int = 2,
                 log: Callable[[str], None] = print, progress_factory=None) -> dict:
    """Train (or keep) every model of the family under ``out_dir``; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards_per_family = {name: len(s) for name, s in SHARD_FAMILIES.items()}
    if len(set(shards_per_family.values())) != 1:
        raise ValueError(f"families differ in shard count {shards_per_family}: one paragon cannot match both")
    n_shards = next(iter(shards_per_family.values()))
    manifest = {"plan": asdict(plan), "threads": threads, "models": {}}
    previous = _previous_manifest(out_dir / MANIFEST)
    base_path = out_dir / "base.safetensors"
    for stem, shard in stage_files(plan).items():
        path = out_dir / f"{stem}.safetensors"
        if stem == "base":
            config = plan.base()
        else:
            config = plan.finetune(plan.shard_steps * (n_shards if stem == "paragon" else 1))
        parent = None if stem == "base" else sha256_file(base_path, use_cache=False)
        spec = _spec(plan, stem, config, parent)
        started = time.perf_counter()
        if _already_trained(path, spec):
            log(f"{stem}: kept {path.name} (same training spec)")
            # The time it took when it was trained, if the last manifest recorded this very file.
            before = previous.get(stem, {})
            seconds = before.get("seconds") if before.get("sha256") == sha256_file(path, use_cache=False) else None
        else:
            model = build_toy_model(plan.seed, plan.model_config()) if stem == "base" else load_toy_checkpoint(base_path)
            bar = progress_factory(stem, config.steps) if progress_factory else None
            ema = train(model, config, stage=stem, shard=shard, threads=threads,
                        progress=(lambda step, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.4f}")) if bar else None)
            if bar is not None:
                bar.close()
            save_toy_checkpoint(ema, path, metadata={SPEC_KEY: json.dumps(spec, sort_keys=True)}, overwrite=True)
            seconds = time.perf_counter() - started
            log(f"{stem}: {config.steps} steps × {config.batch} in {seconds:.0f} s → {path}")
        manifest["models"][stem] = {
            "file": path.name, "shard": shard.name if shard else ("union" if stem == "paragon" else "all"),
            "steps": config.steps, "batch": config.batch, "seconds": seconds, "sha256": sha256_file(path, use_cache=False),
        }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# What the demo ships (lib_merge/toy/pretrained/): two domain shard models, as model A and B.
PRETRAINED = {"toy-round": "domain-round", "toy-square": "domain-square"}


def export_pretrained(models_dir: Path, target: Path) -> Dict[str, str]:
    """Write the shipped models as fp16 copies of the family's shard models (3 MB each; the
    8 MB budget of the package) with their training spec; returns name → sha256."""
    import torch

    target.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, stem in PRETRAINED.items():
        source = models_dir / f"{stem}.safetensors"
        with open_checkpoint(source) as reader:
            spec = (reader.metadata or {}).get(SPEC_KEY)
        path = save_toy_checkpoint(load_toy_checkpoint(source), target / f"{name}.safetensors", dtype=torch.float16,
                                   metadata={SPEC_KEY: spec} if spec else None, overwrite=True)
        out[name] = sha256_file(path, use_cache=False)
    return out


def _previous_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}


def plan_with(name: str, **overrides) -> FamilyPlan:
    if name not in PLANS:
        raise ValueError(f"plan {name!r}: choose one of {', '.join(PLANS)}")
    return replace(PLANS[name], **{k: v for k, v in overrides.items() if v is not None})
