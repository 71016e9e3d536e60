"""Architecture detection from a checkpoint header: key names, shapes and metadata, never tensor
data.

Key names and structure decide (which text encoder is present, ``label_emb``, the number of U-Net
input blocks, whether the transformer projections are linear), so small synthetic models with
real key names but shrunk widths are detected like the real ones. The cross-attention context
width (768 / 1024 / 2048) is only a fallback for U-Net-only files whose structure is ambiguous.
"""
from __future__ import annotations

import re
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import ArchitectureMismatchError, UnknownArchitectureError
from .keys import TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX
from .spec import SD1, SD2, SDXL, ModelInfo

# Markers, most specific first. Prefix tests rather than single keys, so files whose text
# encoders were pruned to fewer layers are still recognised.
SDXL_TEXT_MARKER = "conditioner.embedders.1.model.transformer.resblocks."
SDXL_REFINER_TEXT_MARKER = "conditioner.embedders.0.model.transformer.resblocks."
SD2_TEXT_MARKER = "cond_stage_model.model.transformer.resblocks."
SD1_TEXT_MARKER = "cond_stage_model.transformer.text_model."
SDXL_UNET_MARKER = UNET_PREFIX + "label_emb.0.0.weight"
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"

_CONTEXT_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
_BY_NAME = {SD1.name: SD1, SD2.name: SD2, SDXL.name: SDXL}
_REFINER = "sdxl_refiner"
_REFINER_MESSAGE = "SDXL refiner is not supported"

_BLOCK_INDEX = re.compile(r"^model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.")
_V_PREDICTION_VALUES = {"v", "v_prediction", "v-prediction", "vpred", "v_pred"}
_EPSILON_VALUES = {"epsilon", "eps"}
_TRUE = {"true", "1", "yes"}


def _looked_for() -> str:
    return ", ".join(
        repr(m + "*") if m.endswith(".") else repr(m)
        for m in (SDXL_TEXT_MARKER, SD2_TEXT_MARKER, SD1_TEXT_MARKER, SDXL_UNET_MARKER, CONV_IN_KEY)
    )


def _foreign_format_hint(keys: Sequence[str]) -> str:
    """A short guess at what a non-checkpoint file is, so the error tells the user what to do."""
    if any(k.startswith(("lora_unet_", "lora_te")) or "lora_" in k for k in keys):
        return " It looks like a LoRA/LyCORIS file, not a checkpoint."
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.")) for k in keys):
        return (
            " It looks like a diffusers-format U-Net; convert it to a single-file (ldm)"
            " checkpoint."
        )
    if any(k.startswith(("input_blocks.", "diffusion_model.input_blocks.")) for k in keys):
        return (
            " Its U-Net keys lack the 'model.diffusion_model.' prefix; re-save it as a single-file"
            " checkpoint."
        )
    vae_parts = ("encoder.", "decoder.", "quant_conv", "post_quant_conv")
    if keys and all(k.startswith(vae_parts) for k in keys):
        return " It looks like a standalone VAE."
    return ""


def _unknown(source: str, reason: str, keys: Sequence[str]) -> UnknownArchitectureError:
    return UnknownArchitectureError(
        f"{source}: cannot tell the architecture: {reason}. Looked for the marker keys "
        f"{_looked_for()}.{_foreign_format_hint(keys)}"
    )


def _text_family(keys: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """(family, the marker that decided) from the text-encoder keys, or (None, None)."""
    for marker, family in (
        (SDXL_TEXT_MARKER, SDXL.name),
        (SD2_TEXT_MARKER, SD2.name),
        (SD1_TEXT_MARKER, SD1.name),
    ):
        if any(k.startswith(marker) for k in keys):
            return family, marker
    if any(k.startswith(SDXL_REFINER_TEXT_MARKER) for k in keys):
        return _REFINER, SDXL_REFINER_TEXT_MARKER
    return None, None


def _context_dim(shapes: Mapping[str, Sequence[int]], unet_keys: Sequence[str]) -> Optional[int]:
    for key in unet_keys:
        if key.endswith(".attn2.to_k.weight"):
            shape = shapes[key]
            if len(shape) == 2:
                return int(shape[1])
    return None


def _unet_family(
    shapes: Mapping[str, Sequence[int]], unet_keys: Sequence[str]
) -> Tuple[Optional[str], str, Optional[int]]:
    """(family or None, how it was decided, context width) from the U-Net's structure."""
    n_in = n_out = 0
    for key in unet_keys:
        m = _BLOCK_INDEX.match(key)
        if m:
            if m.group(1) == "input_blocks":
                n_in = max(n_in, int(m.group(2)) + 1)
            else:
                n_out = max(n_out, int(m.group(2)) + 1)
    context = _context_dim(shapes, unet_keys)
    has_label = SDXL_UNET_MARKER in shapes
    if has_label and n_in == 9:
        return SDXL.name, "label_emb and 9 input blocks", context
    if has_label and n_in == 12:
        return _REFINER, "label_emb and 12 input blocks", context
    if has_label:
        return None, f"label_emb with {n_in} input blocks", context
    if n_in == 12:
        proj_ndims = {
            len(shapes[k]) for k in unet_keys if k.endswith(".proj_in.weight")
        }
        if proj_ndims == {2}:
            return SD2.name, "linear transformer proj_in (2-D weight)", context
        if proj_ndims == {4}:
            return SD1.name, "1x1-conv transformer proj_in (4-D weight)", context
    # Structure inconclusive: fall back to the cross-attention context width.
    fam = _CONTEXT_FAMILIES.get(context) if context is not None else None
    if fam is not None:
        return fam, f"cross-attention context width {context}", context
    return None, f"{n_in} input blocks, {n_out} output blocks, context width {context}", context


def _read_metadata(
    metadata: Optional[Mapping[str, str]], notes: List[str]
) -> Tuple[Optional[bool], bool]:
    v_pred: Optional[bool] = None
    ztsnr = False
    if not metadata:
        return v_pred, ztsnr
    for key in ("modelspec.prediction_type", "prediction_type"):
        value = metadata.get(key)
        if value is None:
            continue
        text = str(value).strip().lower()
        if text in _V_PREDICTION_VALUES:
            v_pred = True
            notes.append(f"v-prediction from metadata {key}={value!r}")
        elif text in _EPSILON_VALUES:
            v_pred = False
        break
    if v_pred is None and str(metadata.get("ss_v_parameterization", "")).strip().lower() in _TRUE:
        v_pred = True
        notes.append("v-prediction from training metadata ss_v_parameterization")
    if str(metadata.get("ss_zero_terminal_snr", "")).strip().lower() in _TRUE:
        ztsnr = True
    return v_pred, ztsnr


def detect_architecture(
    shapes: Mapping[str, Sequence[int]],
    metadata: Optional[Mapping[str, str]] = None,
    source: str = "model",
) -> ModelInfo:
    """Identify SD1.x, SD2.x or SDXL from a header's ``key -> shape`` map (plus its metadata).

    ``source`` names the file in error messages. Raises ``UnknownArchitectureError`` for layouts
    that match no supported family (naming the marker keys that were looked for) and
    ``ArchitectureMismatchError`` when the text encoder and the U-Net belong to different
    families.
    """
    keys = list(shapes)
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
    if not keys:
        raise _unknown(source, "the file has no tensors", keys)
    if CONV_IN_KEY not in shapes:
        raise _unknown(source, f"no U-Net input convolution {CONV_IN_KEY!r}", keys)

    notes: List[str] = []
    text_fam, text_marker = _text_family(keys)
    unet_fam, unet_reason, context = _unet_family(shapes, unet_keys)

    if _REFINER in (text_fam, unet_fam):
        raise UnknownArchitectureError(
            f"{source}: {_REFINER_MESSAGE} (found "
            f"{(text_marker + '*') if text_fam == _REFINER else unet_reason}); merge SDXL base "
            "models (Pony, Illustrious and NoobAI are base models) or SD1.x/SD2.x"
        )

    if text_fam is not None:
        family = text_fam
        if unet_fam is not None and unet_fam != text_fam:
            xl_conflict = SDXL.name in (text_fam, unet_fam)
            context_agrees_with_unet = _CONTEXT_FAMILIES.get(context) == unet_fam
            if xl_conflict or context_agrees_with_unet:
                raise ArchitectureMismatchError(
                    f"{source}: the text encoder is {_BY_NAME[text_fam].label} "
                    f"({text_marker}*) but the U-Net is {_BY_NAME[unet_fam].label} ({unet_reason});"
                    " the file mixes two architectures and cannot be merged by blocks"
                )
            notes.append(
                f"text encoder says {_BY_NAME[text_fam].label}, U-Net {unet_reason} suggests "
                f"{_BY_NAME[unet_fam].label}; trusting the text encoder"
            )
    elif unet_fam is not None:
        family = unet_fam
    else:
        raise _unknown(source, f"no known text encoder and a U-Net with {unet_reason}", keys)

    arch = _BY_NAME[family]
    if family == SDXL.name and unet_fam is None:
        raise _unknown(source, f"SDXL text encoders but the U-Net has {unet_reason}", keys)

    conv_in = shapes[CONV_IN_KEY]
    in_channels = int(conv_in[1]) if len(conv_in) > 1 else 0
    inpainting = in_channels == 9
    if inpainting:
        notes.append("inpainting U-Net (9-channel conv_in)")
    elif in_channels != 4:
        notes.append(
            f"U-Net conv_in takes {in_channels} channels (4 = text-to-image, 9 = inpainting); "
            "it only merges with models of the same input width"
        )

    v_pred, ztsnr = _read_metadata(metadata, notes)
    if "v_pred" in shapes:
        v_pred = True
        notes.append("v-prediction marker key 'v_pred'")
    if any(k.startswith("edm_vpred.") for k in keys):
        v_pred = True
        notes.append("EDM v-prediction (edm_vpred.* keys)")
    if "ztsnr" in shapes:
        ztsnr = True
    if ztsnr:
        notes.append("zero terminal SNR (ztsnr)")

    has_te = any(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys)
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    if not has_te and not has_vae:
        notes.append(f"U-Net only; {arch.label} detected from {unet_reason}")
    else:
        if not has_te:
            notes.append("no text encoder keys")
        if not has_vae:
            notes.append("no VAE keys (first_stage_model.*)")

    width = shapes.get(UNET_PREFIX + "time_embed.0.weight")
    if width is not None and len(width) == 2 and int(width[1]) != 320:
        notes.append(
            f"U-Net model channels {int(width[1])} instead of 320: a shrunk (synthetic) model"
        )

    ema = sum(1 for k in keys if k.startswith("model_ema.") and k not in (
        "model_ema.decay", "model_ema.num_updates"))
    if ema:
        notes.append(f"{ema} EMA tensors (model_ema.*), dropped when merging")

    return ModelInfo(
        arch=arch,
        inpainting=inpainting,
        v_prediction=v_pred,
        ztsnr=ztsnr,
        unet_in_channels=in_channels,
        has_text_encoder=has_te,
        has_vae=has_vae,
        notes=tuple(notes),
    )


MARKER_PREFIXES = ("v_pred", "ztsnr", "edm_vpred.", "edm_mean", "edm_std")


def is_prediction_marker(key: str) -> bool:
    return key in ("v_pred", "ztsnr", "edm_mean", "edm_std") or key.startswith("edm_vpred.")


def prediction_type(info: ModelInfo, keys) -> Optional[str]:
    """``eps``, ``v``, ``v+ztsnr``, ``eps+ztsnr`` or ``edm-v`` (CosXL; ``edm_vpred.*`` keys), from
    the header (lora-reference.md §8); None where the file does not say (SD2: 768-v files carry
    no marker, so an unmarked SD2 model is unknown, not eps)."""
    keys = list(keys)
    if any(k.startswith("edm_vpred.") for k in keys):
        return "edm-v"
    if info.v_prediction:
        base = "v"
    elif info.v_prediction is False or info.arch.name != SD2.name:
        base = "eps"
    else:
        return None
    return base + ("+ztsnr" if info.ztsnr else "")
