"""Per-instance hooks that apply PAG, SEG, NAG and FreeU inside any ldm-layout U-Net.

Hosts swap the attention *class* ``forward`` for their optimised kernels (A1111's
sd_hijack_optimizations, xformers, sdp, ...). We never patch a class: forward hooks on each chosen
``attn1`` instance (PAG) and on its ``to_q`` projection (SEG) work whatever kernel runs inside,
because every kernel calls ``to_q``/``to_v``/``to_out`` through the module. Perturbations touch
only explicit batch rows, so one batched forward can carry ``[c, u, c_pag, c_seg]``.

Block names: ``M00`` = ``middle_block``, ``INnn`` = ``input_blocks.nn``, ``OUTnn`` =
``output_blocks.nn``; a spec is ``"all"`` or a comma list of names and same-kind ranges
(``"IN07,IN08"``, ``"OUT00-OUT02"``). A block means every ``transformer_blocks.*.attn1`` in it
(``attn2``, the cross-attention, for NAG).

NAG hooks ``attn2.to_q`` (to keep the queries) and the input of ``attn2.to_out`` (the attention
result before the output projection, where the paper applies it), so it too works with any
kernel. Every hook counts the forwards in which it acted (``take_effect``), for the stack's
proof of effect: a hook that the host bypasses never counts.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..errors import BadParameterError
from .freeu import backbone_factor, fourier_filter, freeu_patch, freeu_stage
from .nag import multihead_attention, nag_attention
from .pag import perturbed_self_attention
from .seg import blur_queries, feature_hw

_NAME = re.compile(r"^(IN|OUT|M)(\d{1,2})$")
_ATTN1 = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn1$")
_ATTN2 = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn2$")


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


def _attention(block: nn.Module, pattern: re.Pattern) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in block.named_modules() if pattern.search(path)]


def find_attention_layers(diffusion_model: nn.Module, spec: str, *, cross: bool = False) -> list[tuple[str, str, nn.Module]]:
    """(block name, module path, module) for every self-attention (``attn1``) layer of the blocks
    in ``spec``, or every cross-attention (``attn2``) layer with ``cross=True``."""
    blocks = unet_blocks(diffusion_model)
    pattern = _ATTN2 if cross else _ATTN1
    kind = "cross-attention" if cross else "self-attention"
    with_attention = {name: (path, _attention(m, pattern)) for name, path, m in blocks}
    usable = [name for name, (_, layers) in with_attention.items() if layers]
    wanted = parse_block_spec(spec)
    if wanted is None:
        wanted = usable
    unknown = [n for n in wanted if n not in with_attention]
    if unknown:
        raise BadParameterError(
            f"layers {spec!r}: this U-Net has no block {', '.join(unknown)}; blocks with {kind}: {', '.join(usable)}"
        )
    empty = [n for n in wanted if not with_attention[n][1]]
    if empty:
        raise BadParameterError(
            f"layers {spec!r}: block {', '.join(empty)} has no {kind}; choose from {', '.join(usable)}"
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
        self.applied = {"PAG": 0, "SEG": 0}  # layer calls that perturbed rows, since take_effect()
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

    def take_effect(self) -> dict[str, int]:
        """Layer calls per method that perturbed their rows since the last call (then reset)."""
        out, self.applied = self.applied, {"PAG": 0, "SEG": 0}
        return out

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
        self.applied["PAG"] += 1
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
        self.applied["SEG"] += 1
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
        self.forwards_on = 0  # forwards in which FreeU was active, since take_effect()
        self.patched = 0  # stages patched in them
        self._handles = [diffusion_model.middle_block.register_forward_hook(self._middle_done)]
        for i, block in enumerate(diffusion_model.output_blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            if i + 1 < n:
                self._handles.append(block.register_forward_hook(self._make_post(i + 1)))

    def _middle_done(self, _module, _args, out):
        self._widths[0] = out.shape[1]
        # One decision per U-Net forward, taken before the decoder starts.
        self._on = bool(self.active())
        self.forwards_on += self._on

    def take_effect(self) -> tuple[int, int]:
        """(active forwards, patched stages) since the last call (then reset)."""
        out = (self.forwards_on, self.patched)
        self.forwards_on = self.patched = 0
        return out

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
            if stage[0] != 1.0 or stage[1] != 1.0:
                self.patched += 1
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


class NagHooks(_HookSet):
    """Handle of installed NAG hooks on ``attn2`` layers; rows and negative context change per forward.

    ``set_rows(rows, negative)``: ``rows`` are the batch rows to guide (slices, in order) and
    ``negative`` the NAG negative context with one row per guided row (or one row for all),
    a (rows, tokens, context_dim) tensor; SDXL's dict conditioning passes its ``crossattn``.
    """

    def __init__(self, layers, *, scale: float, tau: float, alpha: float):
        self.layers = layers
        self.scale, self.tau, self.alpha = float(scale), float(tau), float(alpha)
        self.rows: list[slice] = []
        self.negative: torch.Tensor | None = None
        self.expected_batch: int | None = None
        self.skipped_calls = 0
        self._queries: dict[int, torch.Tensor] = {}
        self._reset_effect()
        self._handles = []
        for _, _, attn in layers:
            to_out = attn.to_out
            target = to_out[0] if isinstance(to_out, nn.ModuleList) and not isinstance(to_out, nn.Sequential) else to_out
            self._handles.append(attn.to_q.register_forward_hook(self._keep_queries(attn)))
            self._handles.append(target.register_forward_pre_hook(self._guide(attn)))

    def _reset_effect(self) -> None:
        self.applied, self.max_change, self.max_reference = 0, 0.0, 0.0

    def set_rows(self, rows: list[slice], negative: torch.Tensor | None, batch_size: int | None = None) -> None:
        self.rows = [r for r in rows if r.stop is None or r.stop > (r.start or 0)]
        self.negative = negative
        self.expected_batch = batch_size
        self._queries.clear()

    def take_effect(self) -> tuple[int, float, float]:
        """(layer calls guided, max |Ẑ_out − Z⁺|, max |Z⁺|) since the last call (then reset)."""
        out = (self.applied, self.max_change, self.max_reference)
        self._reset_effect()
        return out

    def _index(self, batch: int, device) -> torch.Tensor | None:
        if not self.rows or self.negative is None:
            return None
        if self.expected_batch is not None and batch != self.expected_batch:
            return None
        if any((r.stop or batch) > batch for r in self.rows):
            return None
        return torch.cat([torch.arange(batch, device=device)[r] for r in self.rows])

    def _keep_queries(self, attn):
        def hook(_to_q, _args, q):
            if self.rows and self.negative is not None:
                self._queries[id(attn)] = q
            return None

        return hook

    def _guide(self, attn):
        def pre_hook(_to_out, args):
            q = self._queries.pop(id(attn), None)
            if q is None or not args:
                return None
            z = args[0]
            index = self._index(z.shape[0], z.device)
            if index is None or q.shape[0] != z.shape[0]:
                self.skipped_calls += 1
                return None
            negative = self.negative.to(device=z.device, dtype=attn.to_k.weight.dtype)
            if negative.shape[0] not in (1, index.numel()):
                self.skipped_calls += 1
                return None
            k, v = attn.to_k(negative), attn.to_v(negative)
            if k.shape[0] == 1 and index.numel() > 1:
                k, v = k.expand(index.numel(), -1, -1), v.expand(index.numel(), -1, -1)
            z_pos = z[index]
            z_neg = multihead_attention(q[index], k.to(q.dtype), v.to(q.dtype), attn.heads)
            guided = nag_attention(z_pos, z_neg.to(z_pos.dtype), self.scale, self.tau, self.alpha)
            self.applied += 1
            self.max_change = max(self.max_change, float((guided.detach().float() - z_pos.detach().float()).abs().max()))
            self.max_reference = max(self.max_reference, float(z_pos.detach().abs().max()))
            z = _writable(z)
            z[index] = guided
            return (z,) + tuple(args[1:])

        return pre_hook


def install_nag(diffusion_model: nn.Module, *, layers: str, scale: float, tau: float, alpha: float) -> NagHooks:
    """Hook NAG onto the cross-attention of the blocks in ``layers``; guided rows are set per forward."""
    found = find_attention_layers(diffusion_model, layers, cross=True)
    return NagHooks(found, scale=scale, tau=tau, alpha=alpha)
