"""The Merge Board's host adapter for AUTOMATIC1111 1.10 (``modules`` imported lazily).

Weights are written through ``module.load_state_dict(partial, strict=False)`` on each module that
owns a patched tensor: the Lora built-in patches ``_load_from_state_dict`` of Linear/Conv2d/
GroupNorm/LayerNorm to drop that module's ``network_weights_backup``, so the next generation backs
up the merged weights and applies the LoRA on top of them. (Calling ``load_state_dict`` on the
whole U-Net with a partial dict would drop the backups of every module — including ones whose
weights still hold a LoRA — and the LoRA would then be applied twice.) A's originals are taken
from those backups when a LoRA is applied.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...live import LiveTarget, WriteItem, get_attr
from .a1111_text import (
    forget_cached_conditioning,
    index_text_encoders,
    lora_backup,
    refresh_empty_prompt,
    text_encoder_root,
)
from .host import BoardSettings, Checkpoint, PreviewRequest, PreviewResult, recipe_infotext, scan_loras

UNET_PREFIX = "model.diffusion_model."
SECTION = ("mergeboard", "Merge Board")
OPTIONS = {
    # key: (default, label)
    "mergeboard_output_dir": ("", "Merge Board: save merged models in this subfolder of the checkpoint folder (empty = the folder itself)"),
    "mergeboard_dtype": ("fp16", "Merge Board: default dtype of saved models"),
    "mergeboard_threads": (0, "Merge Board: worker threads for saving (0 = automatic)"),
    "mergeboard_device": ("cpu", "Merge Board: math device (merges are memory-bound; the CPU is used)"),
    "mergeboard_cache_mb": (0, "Merge Board: RAM for model A's originals during live preview, MB (0 = no limit; "
                               "beyond it originals identical to A's file are re-read from it)"),
}


def _split_owner(key_rest: str) -> tuple[str, str]:
    owner, _, leaf = key_rest.rpartition(".")
    return owner, leaf


class A1111Target(LiveTarget):
    """The U-Net (``sd_model.model.diffusion_model``) and the text encoders of A1111's loaded
    ``sd_model``, under their checkpoint key names (see ``a1111_text`` for the encoders)."""

    label = "A1111"

    def __init__(self, sd_model: Any):
        modules = {UNET_PREFIX: sd_model.model.diffusion_model}
        text = text_encoder_root(sd_model)
        if text is not None:
            modules[text[0]] = text[1]
        super().__init__(modules)
        self.owner = sd_model
        self._fp16_originals: dict[str, torch.Tensor] = {}
        self._text_index: dict[str, tuple[torch.nn.Module, str]] | None = None
        self._text_written = False

    def identity(self) -> tuple:
        return (id(self.owner), id(self.modules[UNET_PREFIX]))

    def check(self) -> None:
        from ...live import LiveMergeError

        # A few parameters tell (the host moves whole models): walking all 700 would cost more than a patch.
        if any(p.device.type == "meta" for p in itertools.islice(self.modules[UNET_PREFIX].parameters(), 4)):
            raise LiveMergeError("the WebUI unloaded the model (its weights are gone); load a checkpoint again")

    def _text(self) -> dict[str, tuple[torch.nn.Module, str]]:
        if self._text_index is None:
            self._text_index = {}
            for prefix, module in self.modules.items():
                if prefix != UNET_PREFIX:
                    self._text_index.update(index_text_encoders(prefix, module))
        return self._text_index

    def _owner(self, key: str) -> tuple[torch.nn.Module, str]:
        if not key.startswith(UNET_PREFIX):
            return self._text()[key]
        owner, leaf = _split_owner(key[len(UNET_PREFIX):])
        module = get_attr(self.modules[UNET_PREFIX], owner) if owner else self.modules[UNET_PREFIX]
        return module, leaf

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {UNET_PREFIX + k: t for k, t in self.modules[UNET_PREFIX].state_dict(keep_vars=True).items()}
        out.update({key: get_attr(module, name) for key, (module, name) in self._text().items()})
        return out

    def current(self, key: str) -> torch.Tensor:
        module, name = self._owner(key)
        return get_attr(module, name)

    def original(self, key: str) -> torch.Tensor:
        module, name = self._owner(key)
        # With a LoRA applied the module's weights are A + LoRA; the Lora built-in's backup is A.
        backup = lora_backup(module, name)
        return backup if backup is not None else get_attr(module, name)

    def write(self, items: Sequence[WriteItem]) -> None:
        grouped: dict[int, tuple[torch.nn.Module, dict[str, torch.Tensor], list[WriteItem]]] = {}
        for item in items:
            module, leaf = self._owner(item.key)
            entry = grouped.setdefault(id(module), (module, {}, []))
            entry[1][leaf] = item.value
            entry[2].append(item)
            if not item.key.startswith(UNET_PREFIX):
                self._text_written = True
        for module, state, owned in grouped.values():
            self._fp16_cache(module, owned)
            module.load_state_dict(state, strict=False)

    def flush(self) -> None:
        if self._text_written:
            self._text_written = False
            forget_cached_conditioning()
            refresh_empty_prompt(self.owner)

    def _fp16_cache(self, module: torch.nn.Module, items: Sequence[WriteItem]) -> None:
        """fp8 storage with "cache FP16 weight for LoRA": keep the fp16 copy in step with the weight."""
        for item in items:
            leaf = item.key.rpartition(".")[2]
            attr = f"fp16_{leaf}"
            if not hasattr(module, attr):
                continue
            if item.original:
                if item.key in self._fp16_originals:
                    setattr(module, attr, self._fp16_originals.pop(item.key))
            else:
                self._fp16_originals.setdefault(item.key, getattr(module, attr))
                setattr(module, attr, item.value.detach().to("cpu", torch.float16, copy=True))


def refresh_checkpoint_list() -> None:
    """``sd_models.list_models()`` without its side effect on the selection: when the WebUI was
    started with ``--ckpt`` (both hosts), it makes that file the selected checkpoint again, and the
    next generation would load it in place of the model the user picked."""
    from modules import sd_models, shared

    selected = shared.opts.data.get("sd_model_checkpoint")
    sd_models.list_models()
    if selected and sd_models.get_closet_checkpoint_match(selected) is not None:
        shared.opts.data["sd_model_checkpoint"] = selected


class A1111Host:
    """Host protocol over A1111's ``modules``."""

    name = "a1111"
    has_sampler = True

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self, refresh: bool = False) -> list[Checkpoint]:
        from modules import sd_models

        if refresh:
            refresh_checkpoint_list()
        return [Checkpoint(info.title, Path(info.filename)) for info in sd_models.checkpoints_list.values()]

    def vaes(self) -> list[Checkpoint]:
        try:
            from modules import sd_vae

            sd_vae.refresh_vae_list()
            return [Checkpoint(name, Path(path)) for name, path in sd_vae.vae_dict.items()]
        except Exception:
            return []

    @staticmethod
    def _model() -> Any:
        # model_data.sd_model, never shared.sd_model: reading the latter loads a model
        from modules import sd_models

        return getattr(sd_models.model_data, "sd_model", None)

    def loaded_checkpoint(self) -> Optional[Path]:
        model = self._model()
        info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
        return Path(info.filename) if info is not None else None

    def selected_checkpoint(self) -> Optional[Path]:
        """The checkpoint the WebUI will load (Settings / quicksettings), without loading it."""
        try:
            from modules import sd_models

            info = sd_models.select_checkpoint()
        except Exception:
            return None
        return Path(info.filename) if info is not None else None

    def live_target(self) -> Optional[A1111Target]:
        model = self._model()
        if model is None or getattr(getattr(model, "model", None), "diffusion_model", None) is None:
            return None
        return A1111Target(model)

    def mutation_lock(self):
        from modules import call_queue

        return call_queue.queue_lock

    # -- settings ----------------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        from modules import sd_models, shared

        ckpt_dir = getattr(shared.cmd_opts, "ckpt_dir", None)
        return Path(ckpt_dir) if ckpt_dir else Path(sd_models.model_path)

    def lora_dir(self) -> Path:
        """The Lora extension's folder: ``--lora-dir``, by default models/Lora (A1111 and Forge
        preload.py), i.e. beside the checkpoint folder models/Stable-diffusion."""
        from modules import sd_models, shared

        lora_dir = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(lora_dir) if lora_dir else Path(sd_models.model_path).parent / "Lora"

    def loras(self) -> list[Checkpoint]:
        return scan_loras(self.lora_dir())

    def settings(self) -> BoardSettings:
        from modules import shared

        opts = shared.opts

        def get(key):
            return getattr(opts, key, OPTIONS[key][0])  # no Settings UI under --nowebui

        def as_int(value, default=0):
            try:
                return int(float(value))
            except (TypeError, ValueError):
                return default

        return BoardSettings(
            checkpoint_dir=self.checkpoint_dir(), output_subdir=str(get("mergeboard_output_dir") or ""),
            dtype=str(get("mergeboard_dtype") or "fp16"), threads=as_int(get("mergeboard_threads")),
            device=str(get("mergeboard_device") or "cpu"), cache_mb=as_int(get("mergeboard_cache_mb")),
            lora_dir=self.lora_dir(),
        )

    def notes(self) -> list[str]:
        return ["Live preview patches the loaded model's U-Net and text encoders; the VAE (part of BASE) is merged on save only."]

    def after_save(self, path: Path) -> None:
        refresh_checkpoint_list()

    # -- preview -----------------------------------------------------------------------------------
    def run_preview(self, request: PreviewRequest, session) -> PreviewResult:
        from modules import call_queue

        with call_queue.queue_lock:
            return self._generate(request, session)

    def _generate(self, request: PreviewRequest, session) -> PreviewResult:
        from modules import processing, shared

        shared.state.begin(job="mergeboard_preview")
        try:
            model = shared.sd_model  # loads the selected checkpoint when none is loaded yet
            session.sync(force=True)
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=model, prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                steps=request.steps, width=request.width, height=request.height, cfg_scale=request.cfg_scale,
                sampler_name=request.sampler, batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
            )
            p.extra_generation_params = {"Merge recipe": recipe_infotext(session.last_recipe)}
            try:
                processed = processing.process_images(p)
            finally:
                p.close()
        finally:
            try:
                if not session.enabled:
                    session.sync(None)
            finally:
                shared.state.end()
        if not processed.images:
            raise RuntimeError("the WebUI returned no image (interrupted?)")
        return PreviewResult(processed.images[0], processed.infotexts[0] if processed.infotexts else processed.info)

    # -- hooks -------------------------------------------------------------------------------------
    @staticmethod
    def xyz_grid_finished() -> bool:
        """X/Y/Z labels each cell "<n> out of <total>" and visits cells in index order, so the
        last cell of a grid is the one whose n equals the total."""
        from modules import shared

        match = re.match(r"^\s*(\d+) out of (\d+)\s*$", str(getattr(shared.state, "job", "") or ""))
        return bool(match) and match.group(1) == match.group(2)


def add_settings(options: Optional[dict] = None) -> None:
    """``on_ui_settings``: one section with every Merge Board option."""
    import gradio as gr
    from modules import shared

    widgets = {
        "mergeboard_dtype": (gr.Dropdown, {"choices": ["fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]}),
        "mergeboard_threads": (gr.Slider, {"minimum": 0, "maximum": 16, "step": 1}),
        "mergeboard_device": (gr.Dropdown, {"choices": ["cpu"]}),
        "mergeboard_cache_mb": (gr.Number, {"precision": 0}),
    }
    for key, (default, label) in (options or OPTIONS).items():
        component, args = widgets.get(key, (None, None))
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SECTION))
