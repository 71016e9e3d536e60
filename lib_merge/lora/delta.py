"""Per-module delta math in fp32 (lora-reference.md §1.2–1.4): ΔW of each network type and its
scale s = α/r, the shape of ΔW from part shapes alone, and the two layers that read the current
weight (IA3, DoRA). Pure functions of tensors; no file or key knowledge."""
from __future__ import annotations

import math
import warnings

import torch

from ..errors import MergeError

DORA_EPS = 1e-12  # fp32 guard against a zero column/row norm


def _2d(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(t.shape[0], -1)


def rank_of(kind: str, parts: dict) -> int | None:
    """r in s = α/r, from part shapes (tensors or shape tuples); None: s = 1."""
    def dim0(name):
        value = parts.get(name)
        return None if value is None else int(value.shape[0] if hasattr(value, "shape") else value[0])
    if kind == "lora":
        return dim0("lora_down.weight")
    if kind == "loha":
        return dim0("hada_w1_b")
    if kind == "lokr":
        return dim0("lokr_w1_b") or dim0("lokr_w2_b")
    return None


def scale(kind: str, parts: dict, name: str = "") -> float:
    """s = α/r; no α, or a type without rank (full, norm, a LoKr with both factors full): 1. A
    stored α of 0 means "rank" to kohya and LyCORIS (they save None/0 as r), so s = 1, warned."""
    r = rank_of(kind, parts)
    alpha = parts.get("alpha")
    if r is None or alpha is None:
        return 1.0
    a = float(alpha.float().reshape(-1)[0]) if hasattr(alpha, "float") else float(alpha)
    if a == 0:
        warnings.warn(f"{name}: alpha 0 read as alpha = rank (s = 1), as kohya and LyCORIS save it")
        return 1.0
    return a / r


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """M[o,i,y,x] = Σ_{p,q} t[p,q,y,x]·a[p,o]·b[q,i] (a: [r,out], b: [r,in])."""
    return torch.einsum("pqyx,po,qi->oiyx", t.float(), _2d(a), _2d(b))


def lora_delta(p: dict) -> torch.Tensor:
    up, down = p["lora_up.weight"], p["lora_down.weight"]
    mid = p.get("lora_mid.weight")
    if mid is not None:  # ΔW[o,i,y,x] = Σ T[n,m,y,x]·U[o,n]·D[m,i]
        return torch.einsum("nmyx,on,mi->oiyx", mid.float(), _2d(up), _2d(down))
    return _2d(up) @ _2d(down)


def loha_delta(p: dict) -> torch.Tensor:
    if "hada_t1" in p:
        return _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    return (_2d(p["hada_w1_a"]) @ _2d(p["hada_w1_b"])) * (_2d(p["hada_w2_a"]) @ _2d(p["hada_w2_b"]))


def lokr_delta(p: dict, target: tuple[int, ...]) -> torch.Tensor:
    w1 = p["lokr_w1"].float() if "lokr_w1" in p else _2d(p["lokr_w1_a"]) @ _2d(p["lokr_w1_b"])
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = _2d(p["lokr_w2_a"]) @ _2d(p["lokr_w2_b"])
    if len(target) == 4:
        # [b, d·kh·kw] of a conv: the kernel is the trailing part of each row — A1111, Forge and
        # LyCORIS take the 2-D kron and reshape it to the weight, which is this same layout
        if w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *target[2:])
        w1 = w1.reshape(*w1.shape[:2], 1, 1)
    return torch.kron(w1, w2)


def delta_shape(kind: str, shapes: dict) -> tuple[int, int] | None:
    """(out, in·kh·kw) of ΔW from the part shapes, or None (IA3/norm: no matrix)."""
    def numel(s):
        return math.prod(s)
    if kind == "lora":
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        if "lora_mid.weight" in shapes:
            return up[0], down[1] * numel(shapes["lora_mid.weight"][2:])
        return up[0], numel(down[1:])
    if kind == "loha":
        if "hada_t1" in shapes:
            return shapes["hada_w1_a"][1], shapes["hada_w1_b"][1] * numel(shapes["hada_t1"][2:])
        return shapes["hada_w1_a"][0], numel(shapes["hada_w1_b"][1:])
    if kind == "lokr":
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], numel(shapes["lokr_w1_b"][1:]))
        if "lokr_w2" in shapes:
            w2 = (shapes["lokr_w2"][0], numel(shapes["lokr_w2"][1:]))
        elif "lokr_t2" in shapes:
            w2 = (shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1] * numel(shapes["lokr_t2"][2:]))
        else:
            w2 = (shapes["lokr_w2_a"][0], numel(shapes["lokr_w2_b"][1:]))
        return w1[0] * w2[0], numel(w1[1:]) * w2[1]
    if kind == "full":
        return shapes["diff"][0], numel(shapes["diff"][1:])
    return None


def weight_delta(kind: str, p: dict, target: tuple[int, ...]) -> torch.Tensor | None:
    """s·ΔW reshaped to ``target`` (fp32), or None for types without an additive weight delta."""
    if kind == "lora":
        d = lora_delta(p)
    elif kind == "loha":
        d = loha_delta(p)
    elif kind == "lokr":
        d = lokr_delta(p, target)
    elif kind == "full":
        d = p["diff"].float()
    else:
        return None
    if d.numel() != math.prod(target):
        raise MergeError(f"delta of {d.numel()} values does not fit a weight of shape {list(target)}")
    return d.reshape(target)


def pad_inpaint(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A 4-channel conv_in delta on a 9-channel inpainting conv_in: the extra channels get 0 (A1111)."""
    out = delta.new_zeros(shape)
    out[:, : delta.shape[1]] = delta
    return out


def ia3_apply(w: torch.Tensor, p: dict, strength: float) -> None:
    """W ← W + μ·W⊙w, w per output row (per input column with ``on_input``), in place."""
    scale_vec = p["weight"].float().reshape(-1)
    on_input = "on_input" in p and bool(p["on_input"].reshape(-1)[0])
    shape = [1] * w.dim()
    shape[1 if on_input else 0] = -1
    w.add_(w * scale_vec.reshape(shape), alpha=strength)


def dora_apply(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> None:
    """W ← W + μ(m ⊙ W''/‖W''‖ − W), W'' = W + sΔW (``delta`` already ×s), in place. The axis
    comes from m's shape: [out,1,…] normalises rows (paper, PEFT, LyCORIS ≥ 3.2), [1,in,…]
    columns (LyCORIS ≤ 3.1); the norm is of W + sΔW, as the training definition."""
    w2 = w + delta
    m = magnitude.float()
    out_ch, in_ch = w2.shape[0], w2.shape[1] if w2.dim() > 1 else 1
    shape = [1] * w2.dim()
    if m.numel() == out_ch and (m.dim() <= 1 or m.shape[0] == out_ch):
        norm = w2.reshape(out_ch, -1).norm(dim=1)
        shape[0] = out_ch
    elif m.numel() == in_ch:
        norm = w2.transpose(0, 1).reshape(in_ch, -1).norm(dim=1)
        shape[1] = in_ch
    else:
        raise MergeError(f"dora_scale of shape {list(m.shape)} fits neither the rows nor the columns of {list(w.shape)}")
    out = w2 * (m.reshape(shape) / norm.clamp_min(DORA_EPS).reshape(shape))
    w.add_(out - w, alpha=strength)
