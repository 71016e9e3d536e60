"""Architecture records: the block list of each supported family and what detection found in a file.

Block names follow the supermerger / sd-mecha convention so weight strings written for those tools
paste unchanged: ``BASE`` (text encoders and VAE), ``INnn`` (U-Net input blocks), ``M00`` (the
middle block) and ``OUTnn`` (output blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import UnknownArchitectureError


def _block_names(n_input: int, n_output: int) -> Tuple[str, ...]:
    return (
        ("BASE",)
        + tuple(f"IN{i:02d}" for i in range(n_input))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(n_output))
    )


@dataclass(frozen=True)
class ArchSpec:
    """One model family as the merger sees it: a name for recipes, a label for people, and the
    ordered block names a weight vector addresses."""

    name: str
    label: str
    blocks: Tuple[str, ...]
    n_input_blocks: int
    n_output_blocks: int

    @property
    def last_out(self) -> str:
        """The block that also owns the final ``out.*`` layers (OUT11 / OUT08)."""
        return f"OUT{self.n_output_blocks - 1:02d}"

    def __str__(self) -> str:
        return self.label


def _spec(name: str, label: str, n_input: int, n_output: int) -> ArchSpec:
    return ArchSpec(name, label, _block_names(n_input, n_output), n_input, n_output)


SD1 = _spec("sd1", "SD1.x", 12, 12)
SD2 = _spec("sd2", "SD2.x", 12, 12)
SDXL = _spec("sdxl", "SDXL", 9, 9)

ARCHITECTURES: Dict[str, ArchSpec] = {a.name: a for a in (SD1, SD2, SDXL)}


def get_arch(name: str | ArchSpec) -> ArchSpec:
    """Look an architecture up by name (``sd1``) or label (``SD1.x``), case-insensitively.

    An ``ArchSpec`` passes through, so every public function can take either form.
    """
    if isinstance(name, ArchSpec):
        return name
    if isinstance(name, str):
        wanted = name.strip().lower()
        for arch in ARCHITECTURES.values():
            if wanted in (arch.name, arch.label.lower()):
                return arch
    valid = ", ".join(f"{a.name} ({a.label})" for a in ARCHITECTURES.values())
    raise UnknownArchitectureError(f"unknown architecture {name!r}; valid names: {valid}")


@dataclass(frozen=True)
class ModelInfo:
    """What ``detect_architecture`` learned from a file's header (key names, shapes, metadata).

    ``v_prediction`` is None when the file does not say; SD2 768-v files, for example, are
    v-prediction but carry no marker, so callers must not read None as "epsilon".
    """

    arch: ArchSpec
    inpainting: bool
    v_prediction: Optional[bool]
    ztsnr: bool
    unet_in_channels: int
    has_text_encoder: bool
    has_vae: bool
    notes: Tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for logs and the UI, e.g. ``SDXL, v-prediction, ZTSNR, no VAE``."""
        parts = [self.arch.label]
        if self.inpainting:
            parts.append("inpainting")
        if self.v_prediction:
            parts.append("v-prediction")
        if self.ztsnr:
            parts.append("ZTSNR")
        if not self.has_text_encoder and not self.has_vae:
            parts.append("U-Net only")
        else:
            if not self.has_text_encoder:
                parts.append("no text encoder")
            if not self.has_vae:
                parts.append("no VAE")
        return ", ".join(parts)
