"""``python -m lib_merge demo``: the main job end to end on small synthetic checkpoints with the
real SD1 and SDXL key names — no download. Builds a demo folder (also the default folder of the
standalone board), runs a preset block merge, an add-difference, a 3-model soup and a
noise-then-slerp "controlled noise" merge, inspects the results and prints a summary. When the package
ships the trained toy checkpoints (``lib_merge/toy/pretrained/``), it also merges those and writes a
PNG grid of what each model draws (``lib_merge.toy.demo_grid``)."""
from __future__ import annotations

import sys
from pathlib import Path

# width_divisor 16: real key names and structure, ~1/250 of the parameters (a few MB per model)
DEMO_WIDTH_DIVISOR = 16
DEMO_MODELS = {
    # name: (arch, model index within its family); same family = "fine-tunes" of one base
    "sd15_base.safetensors": ("sd1", 0),
    "sd15_anime.safetensors": ("sd1", 1),
    "sd15_photo.safetensors": ("sd1", 2),
    "sd15_inpainting.safetensors": ("sd1", 3),
    "sdxl_base.safetensors": ("sdxl", 0),
    "sdxl_pony.safetensors": ("sdxl", 1),
    "sdxl_illustrious.safetensors": ("sdxl", 2),
}


def ensure_demo_models(folder: Path) -> list[Path]:
    """Create the demo checkpoints in ``folder`` if they are missing; returns their paths."""
    from .synthetic import write_synthetic_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (arch, index) in DEMO_MODELS.items():
        path = folder / name
        if not path.exists():
            write_synthetic_checkpoint(
                path, arch, width_divisor=DEMO_WIDTH_DIVISOR, family=1 if arch == "sd1" else 2,
                model=index, inpainting=name.endswith("inpainting.safetensors"),
            )
        paths.append(path)
    return paths


def run_demo(folder: Path) -> int:
    from .engine import merge
    from .inspect import format_inspection, inspect_models
    from .recipe import Recipe

    ensure_demo_models(folder)
    out = folder / "merged"
    out.mkdir(exist_ok=True)
    f = lambda name: str(folder / name)  # noqa: E731
    jobs = [
        ("SD1 block merge, preset GRAD_V", "sd15_grad_v.safetensors",
         Recipe("weighted_sum", (f("sd15_base.safetensors"), f("sd15_anime.safetensors")), alpha=0.5, weights="GRAD_V")),
        ("SDXL block merge, preset OUT09 + IN04 override", "sdxl_out09.safetensors",
         Recipe("weighted_sum", (f("sdxl_base.safetensors"), f("sdxl_pony.safetensors")), alpha=0.5, weights="OUT09,IN04=0.3")),
        ("add difference: photo + 0.7 (anime − base)", "sd15_add_difference.safetensors",
         Recipe("add_difference", (f("sd15_photo.safetensors"), f("sd15_anime.safetensors"), f("sd15_base.safetensors")), alpha=0.7)),
        ("3-model soup (SDXL)", "sdxl_soup3.safetensors",
         Recipe("soup", (f("sdxl_base.safetensors"), f("sdxl_pony.safetensors"), f("sdxl_illustrious.safetensors")))),
        ("controlled noise: slerp(A, noise, 0.2)", "sd15_noised.safetensors",
         Recipe("slerp", (f("sd15_anime.safetensors"), "noise(seed=42,scale=1)"), alpha=0.2, seed=42)),
    ]
    print(f"demo models in {folder.resolve()} (synthetic, real key names, 1/{DEMO_WIDTH_DIVISOR} widths)")
    outputs = {}
    for label, name, recipe in jobs:
        result = merge(recipe, out / name, overwrite=True, warn=lambda m: print(f"  warning: {m}", file=sys.stderr))
        outputs[name] = result.path
        print(f"- {label}: {result.path.name}  [{result.short_hash}]  {result.seconds:.2f} s")
    # "... then slerp back": merge the noised model towards its origin, as the recipe in the
    # Constructive Deconstruction write-up does
    back = merge(
        Recipe("slerp", (str(outputs["sd15_noised.safetensors"]), f("sd15_anime.safetensors")), alpha=0.5),
        out / "sd15_noise_then_back.safetensors", overwrite=True,
    )
    print(f"- controlled noise, slerped back halfway: {back.path.name}  [{back.short_hash}]  {back.seconds:.2f} s")
    print()
    print(format_inspection(inspect_models(f("sd15_base.safetensors"), str(outputs["sd15_grad_v.safetensors"]))))
    print()
    print("Next: `python -m lib_merge inspect A B`, `python -m lib_merge merge --help`, "
          f"`python -m lib_merge merge --recipe {outputs['sd15_grad_v.safetensors']} -o copy.safetensors`")
    print()
    demo_pictures(folder)
    return 0


def demo_pictures(folder: Path) -> None:
    """The toy models' merges as a picture, or one line saying why there is none."""
    from .toy import demo_grid

    toys = demo_grid.copy_pretrained(folder)
    if not toys:
        print(f"pictures: skipped — no trained toy checkpoints in {demo_grid.PRETRAINED_DIR} "
              "(this copy of the package ships none)")
        return
    a, b = toys
    print(f"pictures: merging and sampling the trained toy models {a.name} (A) and {b.name} (B) …", flush=True)
    result = demo_grid.make_demo_grid(a, b, folder / "merged" / "toy", log=print)
    print(f"pictures: {result.path.resolve()}  ({result.seconds:.0f} s)")
    print(f"  {result.legend}")
