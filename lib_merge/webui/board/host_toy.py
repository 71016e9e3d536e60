"""The standalone board's sampler for toy models (``lib_merge.toy``): a host like the A1111 and
Forge adapters, whose "WebUI" is a toy model loaded in this process.

Model A of the board's recipe is loaded on the first preview (and again when A changes); the
session's ``LiveMerge`` patches it in place through a plain ``LiveTarget`` over its U-Net and text
encoder — the same live-merge path as in the WebUIs, BASE included — and ``toy.sampling.sample``
draws through the project's guidance stack. With the Live preview switch on, the board re-renders
on every change (``ActionHandlers.on_live_image``) and the patch stays between renders, so a
slider move re-merges only the blocks it changed; off, a Preview renders the merge and puts A back.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable, Optional

from ...errors import MergeError
from ...live import LiveTarget
from .host import PreviewRequest, PreviewResult, recipe_infotext
from .host_standalone import StandaloneHost

# A1111's sampler names (what the board's request carries) → the toy sampler's
SAMPLERS = {"Euler": "euler", "Euler a": "euler_a", "DPM++ 2M": "dpmpp_2m", "DDIM": "ddim"}
DEFAULT_SAMPLER = "Euler"
IMAGES = 4  # one preview = seeds seed … seed+3 side by side: one 16×16 image says little
SCALE = 12  # nearest-neighbour upscale, so the 16×16 pixels are visible as drawn
# guidance knobs the toy sampler takes from a request's options: (name, label, default, max)
OPTIONS = (
    ("cfgpp", "CFG++ λ (0 = off)", 0.0, 1.0),
    ("pag", "PAG scale", 0.0, 10.0),
    ("seg", "SEG scale (σ = ∞)", 0.0, 10.0),
)


def is_toy_file(path: Path) -> bool:
    """A toy checkpoint (or a merge of toy checkpoints), from the header alone: the toy config in
    the metadata, or RGB pixel space (3-channel ``conv_in``) with the toy tokenizer's vocabulary."""
    if Path(path).suffix.lower() not in (".safetensors", ".sft"):
        return False
    from ...io.reader import open_checkpoint
    from ...toy.model import METADATA_KEY, TEXT_PREFIX, UNET_PREFIX
    from ...toy.tokenizer import WordTokenizer

    try:
        with open_checkpoint(path) as reader:
            if METADATA_KEY in (reader.metadata or {}):
                return True
            shapes = reader.shapes()
    except Exception:  # unreadable or not a checkpoint: not ours to judge here
        return False
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    vocab = shapes.get(TEXT_PREFIX + "transformer.text_model.embeddings.token_embedding.weight")
    return (conv_in is not None and len(conv_in) == 4 and int(conv_in[1]) == 3
            and vocab is not None and int(vocab[0]) == WordTokenizer().vocab_size)


def holds_toy_models(paths: Iterable[Path]) -> bool:
    return any(is_toy_file(p) for p in paths)


def _resolution(paths: Iterable[str]) -> Optional[int]:
    """The resolution recorded by the first of ``paths`` that has the toy config: a merged file
    carries the engine's metadata instead, so its models' files tell."""
    from ...io.reader import open_checkpoint
    from ...toy.model import METADATA_KEY, ToyConfig

    for path in paths:
        try:
            with open_checkpoint(path) as reader:
                text = (reader.metadata or {}).get(METADATA_KEY)
        except Exception:
            continue
        if text:
            return ToyConfig.from_json(text).resolution
    return None


class ToyTarget(LiveTarget):
    label = "toy model"

    def __init__(self, model: Any):
        from ...toy.model import TEXT_PREFIX, UNET_PREFIX

        super().__init__({UNET_PREFIX: model.unet, TEXT_PREFIX: model.cond_stage_model})
        self.owner = model


class ToyHost(StandaloneHost):
    """The standalone host over a folder that holds toy models, with a sampler for them."""

    name = "standalone-toy"
    has_sampler = True
    live_images = True  # the board re-renders on every change while Live preview is on
    samplers = tuple(SAMPLERS)
    options = OPTIONS

    def __init__(self, models_dir: Path, **kwargs):
        super().__init__(models_dir, **kwargs)
        self._model = None
        self._file: Optional[tuple] = None  # (path, size, mtime) of the loaded model A

    def loaded_checkpoint(self) -> Optional[Path]:
        return Path(self._file[0]) if self._file is not None else None

    def live_target(self) -> Optional[ToyTarget]:
        return ToyTarget(self._model) if self._model is not None else None

    def notes(self) -> list[str]:
        return [f"Standalone board over {self.models_dir.resolve()} with toy models (lib_merge toy): the preview "
                "draws model A patched with the merge, through the guidance stack. Live preview on: the image "
                "follows every change. Merging, inspecting and saving work for every model in the folder."]

    def _load(self, path: Path, recipe) -> None:
        """Load model A unless the loaded object already is this file (same size and mtime)."""
        from ...toy.model import load_toy_checkpoint

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key == self._file:
            return
        try:
            model = load_toy_checkpoint(path)
        except ValueError:
            raise MergeError(f"model A ({path.name}) is not a toy model: this board draws previews of toy "
                             "checkpoints only (merging and saving work for every model)") from None
        resolution = _resolution([str(path)] + [str(m) for m in recipe.models[1:]])
        if resolution is not None and resolution != model.config.resolution:
            from dataclasses import replace

            model.config = replace(model.config, resolution=resolution)
        # The session sees a new object (LiveTarget identity) and drops the old patch state.
        self._model, self._file = model, key

    def run_preview(self, request: PreviewRequest, session) -> PreviewResult:
        from ...torch_threads import on_one_torch_thread

        with self._lock:
            recipe = session.desired(force=True)
            self._load(Path(recipe.models[0]), recipe)
            try:
                session.sync(force=True)
                shown = session.last_recipe
                image, info = on_one_torch_thread(self._draw, request)
            finally:
                if not session.enabled:
                    session.sync(None)
        return PreviewResult(image, info + (f", Merge recipe: {recipe_infotext(shown)}" if shown is not None else ""))

    def _draw(self, request: PreviewRequest) -> tuple[Any, str]:
        from ...toy.sampling import toy_guidance
        from ...toy.png import grid
        from ...toy.sampling import sample

        options = dict(request.options or {})
        sampler = request.sampler if request.sampler in SAMPLERS else DEFAULT_SAMPLER
        seed = request.seed if request.seed >= 0 else random.randrange(2**31 - IMAGES)
        steps = max(1, min(int(request.steps), 150))
        cfgpp, pag, seg = (float(options.get(name, 0.0) or 0.0) for name, *_ in OPTIONS)
        settings = toy_guidance(cfgpp=cfgpp, pag_scale=pag, seg_scale=seg)  # out of range: BadParameterError
        prompt = request.prompt.strip()
        untitled = "off" if prompt else "empty"
        images = sample(self._model, [prompt] * IMAGES, seed=seed, steps=steps, sampler=SAMPLERS[sampler],
                        cfg_scale=float(request.cfg_scale), settings=settings,
                        negatives=[request.negative_prompt] * IMAGES, untitled=untitled)
        picture = grid([images], scale=SCALE, gutter=4).permute(1, 2, 0).contiguous().numpy()
        size = self._model.config.resolution
        parts = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {request.cfg_scale:g}",
                 f"Seed: {seed}-{seed + IMAGES - 1}", f"Size: {size}x{size}",
                 f"Model: {Path(self._file[0]).stem}"]
        parts += [f"{label.split(' (')[0]}: {value:g}" for (_, label, *_), value in zip(OPTIONS, (cfgpp, pag, seg))
                  if value]
        head = prompt or "(untitled: empty prompt)"
        if request.negative_prompt:
            head += f"\nNegative prompt: {request.negative_prompt}"
        return _pil(picture), head + "\n" + ", ".join(parts)


def _pil(array):
    """A PIL image where Pillow is installed (gradio always brings it), else the array."""
    try:
        from PIL import Image
    except ImportError:
        return array
    return Image.fromarray(array)


