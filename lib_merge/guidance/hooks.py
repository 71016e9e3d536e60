"""Per-instance hooks that apply PAG, SEG and FreeU inside any ldm-layout U-Net.

Hosts swap the attention *class* ``forward`` for their optimised kernels (A1111's
sd_hijack_optimizations, xformers, sdp, ...). We never patch a class: forward hooks on each chosen
``attn1`` instance (PAG) and on its ``to_q`` projection (SEG) work whatever kernel runs inside,
because every kernel calls ``to_q``/``to_v``/``to_out`` through the module. Perturbations touch
only explicit batch rows, so one batched forward can carry ``[c, u, c_pag, c_seg]``.

Block names: ``M00`` = ``middle_block``, ``INnn`` = ``input_blocks.nn``, ``OUTnn`` =
``output_blocks.nn``; a spec is ``"all"`` or a comma list of names and same-kind ranges
(``"IN07,IN08"``, ``"OUT00-OUT02"``). A block means every ``transformer_blocks.*.attn1`` in it.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..errors import BadParameterError
from .freeu import backbone_factor, fourier_filter, freeu_patch, freeu_stage
from .pag import perturbed_self_attention
from .seg import blur_queries, feature_hw

_NAME = re.compile(r"^(IN|OUT|M)(\d{1,2})$")
_ATTN1 = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn1$")


def unet_blocks(diffusion_model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(block name, module path, module) of every U-Net block, in forward order."""
    missing = [n for n in ("input_blocks", "middle_block", "output_blocks") if not hasattr(diffusion_model, n)]
    if missing:
        raise BadParameterError(
            f"unrecognised U-Net layout ({type(diffusion_model).__name__} has no {', '.join(missing)}); "
            "PAG/SEG/FreeU hooks need the ldm layout (input_blocks / middle_block / output_blocks)"
        )
    blocks = [(f"IN{i:02d}", f"input_blocks.{i}", m) for i, m in enumerate(diffusion_model.input_blocks)]
    blocks.append(("M00", "middle_block", diffusion_model.middle_block))
    blocks += [(f"OUT{i:02d}", f"output_blocks.{i}", m) for i, m in enumerate(diffusion_model.output_blocks)]
    return blocks


def block_key(name: str) -> tuple[str, int]:
    """("input"|"middle"|"output", index) of a block name: the key Forge's attention patches use."""
    match = _NAME.match(name.strip().upper())
    if not match:
        raise BadParameterError(f"block {name!r}: expected M00, INnn or OUTnn")
    kind, index = match.group(1), int(match.group(2))
    return {"IN": "input", "M": "middle", "OUT": "output"}[kind], index


def _canonical(name: str) -> str:
    kind, index = block_key(name)
    return {"input": "IN", "middle": "M", "output": "OUT"}[kind] + f"{index:02d}"


def parse_block_spec(spec: str) -> list[str] | None:
    """Block names of ``spec`` in the order given, or None for ``"all"``."""
    text = spec.strip()
    if not text:
        raise BadParameterError("empty layer list: name blocks like 'M00', 'IN07,IN08', 'OUT00-OUT02' or 'all'")
    if text.lower() == "all":
        return None
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "-" in part:
            first, _, last = (s.strip() for s in part.partition("-"))
            (k1, i1), (k2, i2) = block_key(first), block_key(last)
            if k1 != k2 or i2 < i1:
                raise BadParameterError(f"block range {part!r}: both ends must be the same kind, low to high")
            prefix = {"input": "IN", "middle": "M", "output": "OUT"}[k1]
            names += [f"{prefix}{i:02d}" for i in range(i1, i2 + 1)]
        else:
            names.append(_canonical(part))
    return list(dict.fromkeys(names))


def _self_attention(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in block.named_modules() if _ATTN1.search(path)]


def find_attention_layers(diffusion_model: nn.Module, spec: str) -> list[tuple[str, str, nn.Module]]:
    """(block name, module path, attn1 module) for every self-attention layer of the blocks in ``spec``."""
    blocks = unet_blocks(diffusion_model)
    with_attention = {name: (path, _self_attention(m)) for name, path, m in blocks}
    usable = [name for name, (_, layers) in with_attention.items() if layers]
    wanted = parse_block_spec(spec)
    if wanted is None:
        wanted = usable
    unknown = [n for n in wanted if n not in with_attention]
    if unknown:
        raise BadParameterError(
            f"layers {spec!r}: this U-Net has no block {', '.join(unknown)}; blocks with self-attention: {', '.join(usable)}"
        )
    empty = [n for n in wanted if not with_attention[n][1]]
    if empty:
        raise BadParameterError(
            f"layers {spec!r}: block {', '.join(empty)} has no self-attention; choose from {', '.join(usable)}"
        )
    return [(n, f"{with_attention[n][0]}.{p}", m) for n in wanted for p, m in with_attention[n][1]]


def _rows_of(t: torch.Tensor, rows: slice, expected_batch: int | None) -> bool:
    if expected_batch is not None and t.shape[0] != expected_batch:
        return False
    return rows.stop is None or rows.stop <= t.shape[0]


def _writable(t: torch.Tensor) -> torch.Tensor:
    # Sampling runs under no_grad, where the host's tensor can be edited in place; keep autograd intact otherwise.
    return t.clone() if torch.is_grad_enabled() and t.requires_grad else t


class _HookSet:
    """Torch hook handles installed together and removed together (also as a context manager)."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()


class AttentionPerturbations(_HookSet):
    """Handle of installed PAG/SEG hooks. Rows, σ and latent size can change between forwards."""

    def __init__(self, pag_layers, seg_layers, *, pag_rows, seg_rows, seg_sigma, latent_hw):
        self.pag_layers = pag_layers
        self.seg_layers = seg_layers
        self.pag_rows: slice | None = pag_rows
        self.seg_rows: slice | None = seg_rows
        self.seg_sigma = float(seg_sigma)
        self.latent_hw = tuple(latent_hw)
        self.expected_batch: int | None = None
        self.skipped_calls = 0  # forwards whose batch did not match the rows (for diagnostics)
        self._handles = []
        for _, _, attn in pag_layers:
            self._handles.append(attn.register_forward_hook(self._pag_hook, with_kwargs=True))
        for _, _, attn in seg_layers:
            self._handles.append(attn.to_q.register_forward_hook(self._seg_hook))

    def set_rows(self, *, pag_rows: slice | None, seg_rows: slice | None, batch_size: int | None = None) -> None:
        """Rows to perturb in the next forwards; with ``batch_size``, other batch sizes are left alone."""
        self.pag_rows, self.seg_rows, self.expected_batch = pag_rows, seg_rows, batch_size

    def set_latent_hw(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw = tuple(latent_hw)

    def _pag_hook(self, attn, args, kwargs, output):
        rows = self.pag_rows
        if rows is None:
            return None
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        if x is None or not _rows_of(output, rows, self.expected_batch):
            self.skipped_calls += 1
            return None
        output = _writable(output)
        output[rows] = perturbed_self_attention(attn, x[rows]).to(output.dtype)
        return output

    def _seg_hook(self, _to_q, _args, q):
        rows = self.seg_rows
        if rows is None:
            return None
        if not _rows_of(q, rows, self.expected_batch):
            self.skipped_calls += 1
            return None
        q = _writable(q)
        q[rows] = blur_queries(q[rows], feature_hw(self.latent_hw, q.shape[1]), self.seg_sigma)
        return q


def install_attention_perturbations(
    diffusion_model: nn.Module,
    *,
    pag_rows: slice | None,
    seg_rows: slice | None,
    pag_layers: str,
    seg_layers: str,
    seg_sigma: float,
    latent_hw: tuple[int, int],
) -> AttentionPerturbations:
    """Hook PAG (attn1 output := to_out(to_v(x))) and SEG (blurred to_q output) onto their rows; ``.remove()`` undoes it.

    An empty layer spec installs nothing for that method, so a disabled method's (possibly
    invalid for this model) layer list never gets in the way.
    """
    pag = find_attention_layers(diffusion_model, pag_layers) if pag_layers.strip() else []
    seg = find_attention_layers(diffusion_model, seg_layers) if seg_layers.strip() else []
    return AttentionPerturbations(pag, seg, pag_rows=pag_rows, seg_rows=seg_rows, seg_sigma=seg_sigma, latent_hw=latent_hw)


class FreeUHooks(_HookSet):
    """Handle of installed FreeU hooks; ``remove()`` is idempotent."""

    def __init__(self, diffusion_model: nn.Module, settings, model_channels: int, active: Callable[[], bool]):
        unet_blocks(diffusion_model)
        self.settings = settings
        self.model_channels = int(model_channels)
        self.active = active
        n = len(diffusion_model.output_blocks)
        # The backbone width entering output block i is whatever block i-1 (or the middle block)
        # produced; recording it at run time works for any channel layout, ControlNet included.
        self._widths: list[int | None] = [None] * n
        self._on = False
        self._handles = [diffusion_model.middle_block.register_forward_hook(self._middle_done)]
        for i, block in enumerate(diffusion_model.output_blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            if i + 1 < n:
                self._handles.append(block.register_forward_hook(self._make_post(i + 1)))

    def _middle_done(self, _module, _args, out):
        self._widths[0] = out.shape[1]
        # One decision per U-Net forward, taken before the decoder starts.
        self._on = bool(self.active())

    def _make_post(self, next_index: int):
        def record(_module, _args, out):
            self._widths[next_index] = out.shape[1]

        return record

    def _make_pre(self, index: int):
        def patch(_module, args, kwargs):
            width = self._widths[index]
            if not self._on or width is None:
                return None
            joined = args[0] if args else kwargs["x"]
            s = self.settings
            stage = freeu_stage(width, model_channels=self.model_channels, b1=s.freeu_b1, b2=s.freeu_b2,
                                s1=s.freeu_s1, s2=s.freeu_s2)
            if joined.shape[1] <= width or stage is None:
                return None
            if not (torch.is_grad_enabled() and joined.requires_grad):
                # The concatenation is a fresh tensor only this block reads: editing it in place
                # saves the copies of a split, a clone and a second concatenation per block.
                b, skip = stage
                if b != 1.0:
                    factor = backbone_factor(joined[:, :width], b, s.freeu_version)
                    joined[:, : width // 2] *= factor.to(joined.dtype) if torch.is_tensor(factor) else factor
                if skip != 1.0:
                    joined[:, width:] = fourier_filter(joined[:, width:], threshold=1, scale=skip)
                return None
            h, hsp = freeu_patch(
                joined[:, :width], joined[:, width:], model_channels=self.model_channels,
                b1=s.freeu_b1, b2=s.freeu_b2, s1=s.freeu_s1, s2=s.freeu_s2, version=s.freeu_version,
            )
            joined = torch.cat([h, hsp], dim=1)
            if args:
                return (joined,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "x": joined}

        return patch


def install_freeu(diffusion_model: nn.Module, settings, *, model_channels: int, active: Callable[[], bool]) -> FreeUHooks:
    """FreeU via forward pre-hooks on ``output_blocks[i]`` (input = cat([h, h_skip])); applied while ``active()``."""
    return FreeUHooks(diffusion_model, settings, model_channels, active)
