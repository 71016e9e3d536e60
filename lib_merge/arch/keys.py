"""Key classification: which block a checkpoint key belongs to, whether it may be averaged at all,
and which component (U-Net, text encoder, VAE) it is part of.

The block table is explicit and versioned by policy name because the tools in the wild disagree
about ``time_embed`` / ``label_emb`` (merge-reference.md §1.2); the policy name goes into the
recipe so a merge can be reproduced with the same assignment. A policy name never changes
meaning once released: if a tool changes its table again, that becomes a new name.

What supermerger does, read from hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py``
(``blockfromkey`` and the stage-1 loop that turns its second return value into an index of
``BLOCKID`` / ``BLOCKIDXLL`` and then ``weights_a[index - 1]``):

* HEAD 0b1c491 (2025-11-28), unchanged since 2cbd062 "added extended XL merge" (2025-11-27): SD1
  ``time_embed`` gets ``weight_index = 0`` -> ``BLOCKID[1]`` = IN00; SDXL ``time_embed`` /
  ``label_emb`` return ``("TIME"|"LABEL", "IN00")``, so with a 26/20-value vector they take IN00's
  weight. Only a 110-value "extended XL" vector gives TIME and LABEL their own slots. -> policy
  ``supermerger`` (the default), the same table as bbc-mc's merge-block-weighted GUI
  (``scripts/mbw/merge_block_weighted.py`` 8a62a75: ``time_embed`` -> ``weight_index = 0``).
* 3bb6f1f (2023-07-25) up to fde2849, the last commit before 2cbd062: SDXL ``time_embed`` /
  ``label_emb`` return ``"Not Merge"``, which is in no index list, so the loop ``continue``s and
  A's tensor is kept whatever the weights; SD1 ``time_embed`` sets ``weight_index = -2`` and
  ``BLOCKID[-2 + 1]`` wraps round to the last entry, OUT11, whose weight it takes. The preset
  table (``mbwpresets_master.txt``) was used with these versions for over two years, so they are
  kept reproducible as policy ``supermerger-2023``.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence

from ..errors import ArchitectureMismatchError, BadBlockWeightsError
from .spec import SDXL, ArchSpec, get_arch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")

DEFAULT_POLICY = "supermerger"
BLOCK_POLICIES: Dict[str, str] = {
    "supermerger": (
        "supermerger since 2025-11-27 (2cbd062): text encoders and VAE -> BASE, time_embed and "
        "SDXL label_emb -> IN00, out.* -> last OUT block"
    ),
    "supermerger-2023": (
        "supermerger 2023-07-25 (3bb6f1f) to 2025-11-26: as supermerger, but SDXL time_embed and "
        "label_emb are not merged (A kept) and SD1/SD2 time_embed takes OUT11's weight"
    ),
    "bbc-mc": (
        "bbc-mc merge-block-weighted: time_embed (and SDXL label_emb) -> IN00; the same table as "
        "supermerger, pinned to its origin"
    ),
    "sd-mecha": (
        "sd-mecha supermerger_blocks: text encoders, VAE, time_embed and SDXL label_emb -> BASE, "
        "out.* -> last OUT block"
    ),
}

# U-Net sub-modules that are not numbered blocks; where they go depends on the policy.
_EMBEDDING_MODULES = ("time_embed", "label_emb")

KINDS = ("merge", "copy", "drop")

# Top-level buffers of the ldm LatentDiffusion wrapper: the noise schedule is a property of the
# training recipe, so averaging two schedules would describe neither model.
_SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "log_one_minus_alphas_cumprod",
        "logvar",
        "lvlb_weights",
    }
)
_SCHEDULE_PATTERN = re.compile(r"^(posterior_\w+|sqrt_\w*alphas_cumprod\w*)$")
# Empty flag tensors written by A1111 / ComfyUI; their presence is the information.
_MARKER_KEYS = frozenset({"v_pred", "ztsnr"})
_EMA_COUNTERS = frozenset({"model_ema.decay", "model_ema.num_updates"})
# Scalars that model-mixer and ComfyUI's CLIP merge leave alone; named here so the answer does not
# depend on whether the caller passed the shape.
_SCALAR_PARAMS = ("logit_scale",)

_FLOAT_DTYPES = frozenset(
    {
        "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E4M3FN", "F8_E4M3FNUZ", "F8_E5M2",
        "F8_E5M2FNUZ", "FLOAT64", "FLOAT32", "FLOAT16", "BFLOAT16", "FLOAT", "HALF", "DOUBLE",
        "FLOAT8_E4M3FN", "FLOAT8_E4M3FNUZ", "FLOAT8_E5M2", "FLOAT8_E5M2FNUZ",
    }
)


def _check_policy(policy: str) -> None:
    if policy not in BLOCK_POLICIES:
        valid = ", ".join(sorted(BLOCK_POLICIES))
        raise BadBlockWeightsError(
            f"unknown block policy {policy!r}; valid policies: {valid}"
        )


def block_of(arch: ArchSpec | str, key: str, policy: str = DEFAULT_POLICY) -> str:
    """The block (one of ``arch.blocks``) whose weight applies to ``key``.

    Text encoders, VAE, scheduler buffers and anything not under the U-Net prefix go to BASE;
    U-Net keys go to their numbered block, with ``time_embed``/``label_emb`` placed by ``policy``.
    A block index beyond the architecture (``input_blocks.11`` in an SDXL file) raises
    ``ArchitectureMismatchError``: the file does not have the layout it was detected as.
    """
    _check_policy(policy)
    return _block_of(get_arch(arch), key, policy)


@lru_cache(maxsize=16384)
def _block_of(arch: ArchSpec, key: str, policy: str) -> str:
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    rest = key[len(UNET_PREFIX):]
    module, _, tail = rest.partition(".")
    if module == "input_blocks" or module == "output_blocks":
        index_text = tail.partition(".")[0]
        if not index_text.isdigit():
            return "BASE"
        index = int(index_text)
        limit = arch.n_input_blocks if module == "input_blocks" else arch.n_output_blocks
        if index >= limit:
            raise ArchitectureMismatchError(
                f"key {key!r} is in {module} {index}, but {arch.label} has only {limit} "
                f"({module.split('_')[0]} blocks 0-{limit - 1}); the file is not a {arch.label} "
                "checkpoint or was detected wrongly"
            )
        return f"IN{index:02d}" if module == "input_blocks" else f"OUT{index:02d}"
    if module == "middle_block":
        return "M00"
    if module == "out":
        return arch.last_out
    if module in _EMBEDDING_MODULES:
        if policy == "sd-mecha":
            return "BASE"
        if policy == "supermerger-2023" and arch.name != SDXL.name:
            # The BLOCKID[-1] wrap (module docstring); its SD1 branch knows no label_emb.
            return arch.last_out if module == "time_embed" else "BASE"
        # supermerger-2023 keeps SDXL's embeddings from A (kept_from_a); they are listed with IN00.
        return "IN00"
    return "BASE"


def kept_from_a(arch: ArchSpec | str, key: str, policy: str = DEFAULT_POLICY) -> bool:
    """Whether ``policy`` leaves ``key`` out of the merge, so the output holds A's tensor whatever
    the weights (supermerger-2023's "Not Merge" for SDXL ``time_embed`` / ``label_emb``)."""
    _check_policy(policy)
    spec = get_arch(arch)
    if policy != "supermerger-2023" or spec.name != SDXL.name:
        return False
    if not key.startswith(UNET_PREFIX):
        return False
    return key[len(UNET_PREFIX):].partition(".")[0] in _EMBEDDING_MODULES


def keys_by_block(
    arch: ArchSpec | str, keys: Iterable[str], policy: str = DEFAULT_POLICY
) -> Dict[str, List[str]]:
    """Group keys by block, every block of ``arch`` present (possibly empty), in block order."""
    spec = get_arch(arch)
    _check_policy(policy)
    groups: Dict[str, List[str]] = {name: [] for name in spec.blocks}
    for key in keys:
        groups[_block_of(spec, key, policy)].append(key)
    return groups


def _is_integer_dtype(dtype: str) -> bool:
    code = dtype.strip().upper().replace("TORCH.", "")
    if code in ("BOOL", "LONG", "INT", "SHORT", "BYTE", "CHAR"):
        return True
    return bool(re.fullmatch(r"(U?INT|I|U)\d+", code))


def key_kind(key: str, dtype: str, shape: Optional[Sequence[int]] = None) -> str:
    """How a merge treats ``key``: ``"merge"`` (averaged by the method), ``"copy"`` (taken from
    model A unchanged) or ``"drop"`` (left out of the output).

    ``dtype`` is a safetensors code (``F16``, ``I64``, ...); torch names (``torch.int64``) work
    too. ``shape`` is optional; when given, 0-dim and empty tensors are copied because a
    weighted average of a flag or a scalar constant has no meaning.
    """
    if key in _EMA_COUNTERS:
        return "copy"
    if key.startswith("model_ema."):
        # EMA shadow weights: kept out of merged files, as A1111's "prune" does.
        return "drop"
    if _is_integer_dtype(dtype):
        return "copy"
    last = key.rsplit(".", 1)[-1]
    if key in _MARKER_KEYS or last in _MARKER_KEYS or key.startswith("edm_vpred."):
        return "copy"
    if "." not in key and (key in _SCHEDULE_BUFFERS or _SCHEDULE_PATTERN.match(key)):
        return "copy"
    if last in _SCALAR_PARAMS:
        return "copy"
    if shape is not None:
        dims = tuple(int(d) for d in shape)
        if len(dims) == 0 or 0 in dims:
            return "copy"
    if dtype.strip().upper().replace("TORCH.", "") not in _FLOAT_DTYPES:
        # An unknown element type cannot be averaged safely; carrying A's bytes is lossless.
        return "copy"
    return "merge"


def component_of(key: str) -> str:
    """``"unet"``, ``"text_encoder"``, ``"vae"`` or ``"other"`` (schedule buffers, markers, EMA)."""
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return "text_encoder"
    if key.startswith(VAE_PREFIX):
        return "vae"
    return "other"
