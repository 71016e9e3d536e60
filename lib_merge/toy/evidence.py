"""``toy evidence``: train (or keep) the toy family, build every soup and merge through the
project's own pot and engine, sample through the guidance stack, and write the measured tables
and figures to a Markdown report.

Sections follow issue 11: soup vs paragon (domain and aesthetic shards), unlearning through
``soup remove`` on the real pot, style mixing, guidance (untitled and prompted), merge methods.
Spread is over sampling seeds; every model comes from one training seed (the time budget),
which the report says. ``--quick`` runs the same code on tiny settings: it checks the pipeline,
not the claims.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .evaluate import CORE, Evaluator, Protocol, Score
from .family import PLANS, FamilyPlan, train_family
from .model import load_toy_checkpoint
from .png import grid, write_png
from .sampling import TOY_PERTURBATION_LAYERS, sample, toy_guidance
from .shards import AESTHETIC_SHARDS, DOMAIN_SHARDS, SHARD_FAMILIES


@dataclass(frozen=True)
class EvidencePlan:
    family: FamilyPlan
    protocol: Protocol
    classifier_steps: Optional[int]  # None: the classifier's own default (the one that meets the accuracy floor)
    merges: bool = True


FULL = EvidencePlan(
    family=PLANS["full"],
    protocol=Protocol(prompts=48, seeds=(0, 1000, 2000), steps=20, sampler="euler", cfg_scale=5.0,
                      untitled_images=96, real_images=512),
    classifier_steps=None,
)
QUICK = EvidencePlan(
    family=PLANS["quick"],
    protocol=Protocol(prompts=3, seeds=(0, 1), steps=3, sampler="euler", cfg_scale=5.0,
                      untitled_images=6, real_images=48, batch=16),
    classifier_steps=30,
)

# The seed's untitled stack: CFG++ at CFG 1 + PAG + SEG with σ = ∞ (DESIGN.md §1).
SEED_STACK = dict(cfgpp=0.6, pag_scale=3.0, seg_scale=3.0, seg_sigma=math.inf)
GUIDANCE_ROWS = {
    "none (CFG only)": {},
    "CFG++ λ 0.6": dict(cfgpp=0.6),
    "PAG 3": dict(pag_scale=3.0),
    "SEG 3, σ ∞": dict(seg_scale=3.0, seg_sigma=math.inf),
    "FreeU v2": dict(freeu_enabled=True),
    "CFG rescale φ 0.7": dict(rescale_phi=0.7),
    "dynamic thresholding (mimic 5)": dict(dynthres_enabled=True, dynthres_mimic_scale=5.0),
    "seed stack: CFG++ + PAG + SEG": SEED_STACK,
    "PAG 3 at M00 (the WebUI's layer; 2×2 tokens here)": dict(pag_scale=3.0, pag_layers="M00"),
}


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.figures = out.parent / (out.stem + "-figures")
        self.lines: List[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: List[str], rows: List[List[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|")
        self.add(*("| " + " | ".join(r) + " |" for r in rows), "")

    def figure(self, name: str, rows: List[torch.Tensor], caption: str) -> None:
        path = write_png(self.figures / name, grid(rows, scale=4))
        self.add(f"![{caption}]({self.figures.name}/{path.name})", "", f"*{caption}*", "")

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(self.out)


def _in_shard(shard) -> Callable:
    return lambda a: shard.contains(a)


def _groups(shards) -> Dict[str, Callable]:
    return {s.name: _in_shard(s) for s in shards}


def run_evidence(work: Path, out: Path, *, quick: bool = False, threads: int = 2, log=None) -> Path:
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    torch.set_num_threads(threads)

    def timed(name: str):
        class _T:
            def __enter__(self_):
                self_.t = time.perf_counter()
                log(f"[{time.perf_counter() - started:6.0f} s] {name} …")

            def __exit__(self_, *exc):
                timings[name] = time.perf_counter() - self_.t
        return _T()

    models_dir = work / "models"
    with timed("train the family"):
        manifest = train_family(models_dir, plan.family, threads=threads, log=log)
    path = {stem: models_dir / entry["file"] for stem, entry in manifest["models"].items()}

    with timed("train the classifier"):
        clf, accuracy = _classifier(work, plan, threads)

    evaluator = Evaluator(clf, plan.protocol, plan.family.resolution)
    report = Report(out)
    load = _Loader(plan.family.resolution)

    with timed("soups"):
        soups = _soups(work, path, threads)
    with timed("merges"):
        merges = _merges(work, path, threads) if plan.merges else {}

    _header(report, plan, quick, accuracy, manifest)
    with timed("soup vs paragon"):
        soup_rows = _soup_vs_paragon(report, evaluator, load, path, soups)
    with timed("unlearning"):
        _unlearning(report, evaluator, load, soups, soup_rows)
    with timed("style mixing"):
        _style_mixing(report, load, path, soups, plan.protocol)
    with timed("guidance"):
        _guidance(report, evaluator, load, soups["domain"])
    if merges:
        with timed("merge methods"):
            _merge_methods(report, evaluator, load, path, soups, merges)

    total = time.perf_counter() - started
    report.add("## Run", "", f"Command: `python -m lib_merge toy evidence{' --quick' if quick else ''} --threads {threads}`"
               f" · torch {torch.__version__} · {platform.machine()} · {threads} threads.", "",
               "| phase | wall time |", "|---|---|",
               *(f"| {k} | {v:.0f} s |" for k, v in timings.items()), f"| **total** | **{total:.0f} s** |", "")
    report.write()
    log(f"evidence written to {out} in {total:.0f} s")
    return out


class _Loader:
    """Keeps the last few models loaded (a section reuses its models across rows)."""

    def __init__(self, resolution: int):
        self.resolution = resolution
        self.cache: Dict[str, object] = {}

    def __call__(self, path: Path):
        key = str(path)
        if key not in self.cache:
            if len(self.cache) > 8:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = load_toy_checkpoint(path, resolution=self.resolution)
        return self.cache[key]


def _classifier(work: Path, plan: EvidencePlan, threads: int):
    from .classifier import heldout_accuracy, load_classifier, save_classifier, train_classifier

    path = work / f"classifier-{plan.family.resolution}-{plan.classifier_steps or 'default'}.safetensors"
    if path.exists():
        clf = load_classifier(path)
    else:
        kwargs = {"steps": plan.classifier_steps} if plan.classifier_steps else {}
        clf = train_classifier(resolution=plan.family.resolution, seed=0, **kwargs)
        save_classifier(clf, path)
    accuracy = heldout_accuracy(clf, resolution=plan.family.resolution, n=plan.protocol.real_images * 2, seed=99)
    return clf, accuracy


def _soups(work: Path, path: Dict[str, Path], threads: int) -> Dict[str, Path]:
    """Uniform soup per family through the real pot, and each leave-one-out soup via ``remove``."""
    from ..soup.pot import Pot

    out: Dict[str, Path] = {}
    for family, shards in SHARD_FAMILIES.items():
        members = [path[f"{family}-{s.name}"] for s in shards]
        pot_dir = work / "pots" / family
        if pot_dir.exists():
            shutil.rmtree(pot_dir)
        pot = Pot.init(pot_dir)
        pot.add([str(p) for p in members], threads=threads)
        out[family] = work / "soups" / f"soup-{family}.safetensors"
        out[family].parent.mkdir(parents=True, exist_ok=True)
        pot.export(out[family], dtype="fp32", overwrite=True, threads=threads)
        for shard, member in zip(shards, members):
            pot.remove([str(member)], threads=threads)
            name = f"{family}-without-{shard.name}"
            out[name] = work / "soups" / f"soup-{name}.safetensors"
            pot.export(out[name], dtype="fp32", overwrite=True, threads=threads)
            pot.add([str(member)], threads=threads)
    return out


def _merges(work: Path, path: Dict[str, Path], threads: int) -> Dict[str, Path]:
    from ..engine import merge
    from ..recipe import Recipe

    a, b = str(path["domain-round"]), str(path["domain-square"])
    base = str(path["base"])
    shards = [str(path[f"domain-{s.name}"]) for s in DOMAIN_SHARDS]
    recipes = {f"weighted_sum α {x}": Recipe("weighted_sum", (a, b), alpha=x, dtype="fp32") for x in (0.25, 0.5, 0.75)}
    recipes["slerp α 0.5"] = Recipe("slerp", (a, b), alpha=0.5, dtype="fp32")
    recipes["weighted_sum GRAD_V"] = Recipe("weighted_sum", (a, b), alpha=0.5, weights="GRAD_V", dtype="fp32")
    recipes["weighted_sum SMOOTHSTEP"] = Recipe("weighted_sum", (a, b), alpha=0.5, weights="SMOOTHSTEP", dtype="fp32")
    # Task-vector methods of the three domain fine-tunes on their common base; α = 1 as the papers.
    recipes["TIES (k 0.2)"] = Recipe("ties", (base, *shards), alpha=1.0, dtype="fp32")
    recipes["DARE (p 0.9, rescaled)"] = Recipe("dare", (base, *shards), alpha=1.0 / 3, seed=7, dtype="fp32")
    recipes["task arithmetic (λ ⅓)"] = Recipe("task_arithmetic", (base, *shards), alpha=1.0 / 3, dtype="fp32")
    recipes["geometric median"] = Recipe("geometric_median", (base, *shards), dtype="fp32",
                                         params={"include_base": False})
    recipes["model stock"] = Recipe("model_stock", (base, *shards), dtype="fp32")
    recipes["DGMLA"] = Recipe("dgmla", (base, *shards), dtype="fp32", seed=7)
    out: Dict[str, Path] = {}
    for name, recipe in recipes.items():
        target = work / "merges" / (name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
                                    .replace("⅓", "third").replace("α", "a") + ".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        merge(recipe, target, threads=threads, overwrite=True)
        out[name] = target
    return out


def _header(report: Report, plan: EvidencePlan, quick: bool, accuracy: Dict[str, float], manifest: dict) -> None:
    p, f = plan.protocol, plan.family
    report.add(
        "# Evidence: what merges, soups and guidance do to pictures (toy model family)", "",
        "*Generated by `python -m lib_merge toy evidence`; do not edit by hand.*" if not quick else
        "*Quick mode: tiny settings that check the pipeline, not the claims. Numbers here mean nothing.*", "",
        "Models: the toy family of `docs/toy.md` — SD1-layout pixel-space U-Nets "
        f"({f.model_channels}·{list(f.channel_mult)} channels, {f.resolution}×{f.resolution} RGB) with a word-level text "
        f"encoder, trained on CPU: a base ({f.base_steps} steps × {f.batch}), one fine-tune per shard "
        f"({f.shard_steps} steps each) and a paragon fine-tuned on the union with the same compute as one family's "
        f"shard models together ({f.shard_steps * 3} steps). One training seed ({f.seed}); spread (±) is the sample "
        f"standard deviation over the {len(p.seeds)} sampling seeds {list(p.seeds)}.", "",
        "**Metrics are analogues, not the paper's**: *adherence* is the share of samples whose shape, colour and "
        "background texture, as read by an attribute classifier trained on the generator's ground truth, all match "
        "the prompt (our TIFA analogue, not TIFA); *Fréchet* is the Fréchet distance between the classifier's "
        "penultimate features of samples and of held-out real images (our FID analogue, not FID); *untitled yield* "
        "is the share of no-prompt samples whose shape and colour the classifier names with confidence ≥ the fixed "
        "threshold. Nothing here is Image Reward or TIFA.", "",
        f"Sampling: {p.sampler}, {p.steps} steps, CFG {p.cfg_scale} against the empty prompt, through "
        f"`lib_merge.toy.sampling` (the guidance stack and hooks the WebUI adapters use). Prompts: {p.prompts} captions "
        f"from the training split's grammar and {p.prompts} held-out combinations (shape × colour × texture never "
        "trained on).", "",
        "Training (one thread; wall time as measured on this machine while other jobs shared it): " +
        ", ".join(f"{stem} {m['steps']} steps" + (f" in {m['seconds']:.0f} s" if m.get("seconds") else "")
                  for stem, m in manifest["models"].items()) + ".", "",
        "Classifier accuracy on held-out real images: " +
        ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + ".", "",
    )


def _soup_vs_paragon(report, ev: Evaluator, load, path, soups) -> Dict[str, Score]:
    report.add("## Soup vs paragon", "",
               "The paper (Diffusion Soup, arXiv 2406.08431): the uniform soup of shard fine-tunes beats the paragon "
               "trained on the union (Image Reward .34 → .44 on domain shards, .37 → .59 on aesthetic shards; TIFA "
               "85.5 → 86.5 / 85.6 → 86.8).", "")
    rows_by_family: Dict[str, Score] = {}
    paragon = ev.prompted(load(path["paragon"]), groups=_groups(DOMAIN_SHARDS + AESTHETIC_SHARDS), keep_images=True)
    base = ev.prompted(load(path["base"]), groups=_groups(DOMAIN_SHARDS + AESTHETIC_SHARDS))
    rows_by_family["paragon"] = paragon
    for family, shards in SHARD_FAMILIES.items():
        groups = _groups(shards)
        entries = [("base (before fine-tuning)", base), ("paragon (union, equal compute)", paragon)]
        soup = ev.prompted(load(soups[family]), groups=groups, keep_images=True)
        rows_by_family[family] = soup
        entries.append((f"uniform soup of the {len(shards)} shard models", soup))
        singles = []
        for s in shards:
            score = ev.prompted(load(path[f"{family}-{s.name}"]), groups=groups, keep_images=True)
            rows_by_family[f"{family}-{s.name}"] = score
            entries.append((f"shard model: {s.name}", score))
            singles.append(score)
        header = ["model", "adherence", "held-out adherence", *(f"on {s.name} prompts" for s in shards), "Fréchet ↓"]
        rows = [[name, sc.fmt("adherence"), sc.fmt("adherence_heldout"),
                 *(sc.fmt(f"adherence[{s.name}]") for s in shards), sc.fmt("frechet", 2)] for name, sc in entries]
        described = ", ".join(f"{s.name}: {s.attribute} {'/'.join(s.values)}" for s in shards)
        report.add(f"### {family.capitalize()} shards ({described})", "")
        report.table(header, rows)
        report.figure(f"soup-{family}.png", [paragon.images[:12], soup.images[:12], *(x.images[:12] for x in singles)],
                      f"{family} shards — rows: paragon, soup, then each shard model; same prompts and seeds")
    return rows_by_family


def _unlearning(report, ev: Evaluator, load, soups, soup_rows) -> None:
    report.add("## Unlearning: removing one shard's model from the soup", "",
               "`soup remove` subtracts that model from the pot's running sums (no re-average). The paper: removing "
               "one shard's model costs about 1 % (.45 → .44); the removed domain should drop, the others barely move.",
               "")
    for family, shards in SHARD_FAMILIES.items():
        full = soup_rows[family]
        rows = []
        for s in shards:
            without = ev.prompted(load(soups[f"{family}-without-{s.name}"]), groups=_groups(shards))
            removed = without.mean(f"adherence[{s.name}]") - full.mean(f"adherence[{s.name}]")
            others = [x for x in shards if x is not s]
            kept = sum(without.mean(f"adherence[{o.name}]") - full.mean(f"adherence[{o.name}]") for o in others) / len(others)
            rows.append([f"without {s.name}", without.fmt(f"adherence[{s.name}]"), f"{removed:+.3f}",
                         f"{kept:+.3f}", without.fmt("adherence"), without.fmt("frechet", 2)])
        report.add(f"### {family.capitalize()} soup (full soup adherence {full.fmt('adherence')})", "")
        report.table(["soup", "adherence on removed shard's prompts", "Δ removed shard", "Δ other shards (mean)",
                      "adherence (all)", "Fréchet ↓"], rows)


def _style_mixing(report, load, path, soups, protocol: Protocol) -> None:
    from .data import PALETTES

    a, b = PALETTES[0], PALETTES[1]
    subjects = ["large red circle, centre, plain background", "medium blue square, centre, striped background",
                "large yellow triangle, centre, dotted background"]
    prompts = [f"{s}, {style} outlined flat" for s in subjects for style in (a, b, f"{a} {b}")]
    pair = _pair_soup(path, soups, a, b)
    rows = [sample(load(p), prompts, seed=5, steps=protocol.steps, sampler=protocol.sampler, cfg_scale=protocol.cfg_scale)
            for p in (path[f"aesthetic-{a}"], path[f"aesthetic-{b}"], pair)]
    report.add("## Style mixing", "",
               f"A soup of the `{a}` and `{b}` aesthetic models on prompts asking for {a}, {b}, and both at once "
               f"(\"{a} {b}\"); columns repeat that triple for three subjects.", "")
    report.figure("style-mixing.png", rows, f"rows: {a} model, {b} model, soup of the two")


def _pair_soup(path, soups, a: str, b: str) -> Path:
    from ..soup.pot import Pot

    target = soups["aesthetic"].parent / f"soup-{a}-{b}.safetensors"
    pot_dir = target.with_suffix(".pot")
    if pot_dir.exists():
        shutil.rmtree(pot_dir)
    pot = Pot.init(pot_dir)
    pot.add([str(path[f"aesthetic-{a}"]), str(path[f"aesthetic-{b}"])])
    pot.export(target, dtype="fp32", overwrite=True)
    return target


def _guidance(report, ev: Evaluator, load, model_path: Path) -> None:
    model = load(model_path)
    report.add("## Guidance", "",
               "On the domain soup. *Untitled* (empty prompt, CFG 1 — with no prompt CFG has nothing to push "
               "against, so what moves the yield is the perturbation guidance): the seed's claim is about 2 in 10 "
               "legit images with CFG++ + PAG + SEG on a strong merge and far fewer without. *Prompted*: the "
               "same method added to CFG at the protocol's scale, on the prompt set. Equal steps everywhere. "
               f"PAG and SEG perturb `{TOY_PERTURBATION_LAYERS}` (see `toy.sampling.TOY_PERTURBATION_LAYERS`).", "")
    rows, images = [], []
    for name, knobs in GUIDANCE_ROWS.items():
        settings = toy_guidance(**knobs)
        u = ev.untitled(model, settings, cfg=1.0, keep_images=True)
        p = ev.prompted(model, settings)
        rows.append([name, u.fmt("yield"), u.fmt("frechet", 2), p.fmt("adherence"), p.fmt("frechet", 2)])
        images.append(u.images[:12])
    report.table(["guidance", "untitled yield", "untitled Fréchet ↓", "prompted adherence", "prompted Fréchet ↓"], rows)
    report.figure("untitled.png", images, "untitled samples, one row per guidance setting in the table's order")
    high = 12.0
    report.add(f"### High scale: CFG vs APG at CFG {high:g}, and NAG at CFG 1", "")
    rows = []
    for name, knobs, cfg in (("CFG", {}, high), ("APG (η 0, r 5, β −0.5)", dict(apg_enabled=True), high),
                             (f"CFG {ev.protocol.cfg_scale:g} (reference)", {}, None),
                             ("CFG 1 (no guidance)", {}, 1.0), ("NAG at CFG 1 (φ 5)", dict(nag_scale=5.0), 1.0)):
        s = ev.prompted(model, toy_guidance(**knobs), cfg=cfg)
        rows.append([name, s.fmt("adherence"), s.fmt("frechet", 2), s.fmt("saturation"), s.fmt("clipped")])
    report.table(["setting", "adherence", "Fréchet ↓", "saturation", "clipped share"], rows)


def _merge_methods(report, ev: Evaluator, load, path, soups, merges) -> None:
    groups = _groups(DOMAIN_SHARDS[:2])
    report.add("## Merge methods", "",
               "Two-model merges are of the `round` (A) and `square` (B) domain models; the task-vector methods "
               "combine all three domain models on their common base.", "")
    rows, sweep = [], []
    entries = [("A = round (α 0)", path["domain-round"]), *((k, v) for k, v in merges.items() if k.startswith("weighted_sum α")),
               ("B = square (α 1)", path["domain-square"]), *((k, v) for k, v in merges.items() if not k.startswith("weighted_sum α"))]
    entries.insert(len(entries), ("uniform soup (pot)", soups["domain"]))
    for name, p in entries:
        s = ev.prompted(load(p), groups={**groups, **_groups(DOMAIN_SHARDS[2:])}, keep_images=name.startswith(("A =", "B =", "weighted_sum α")))
        rows.append([name, s.fmt("adherence"), *(s.fmt(f"adherence[{g.name}]") for g in DOMAIN_SHARDS), s.fmt("frechet", 2)])
        if s.images is not None:
            sweep.append(s.images[:12])
    report.table(["merge", "adherence", *(f"on {g.name} prompts" for g in DOMAIN_SHARDS), "Fréchet ↓"], rows)
    report.figure("alpha-sweep.png", sweep, "weighted sum of round (A) and square (B): α = 0, .25, .5, .75, 1")
