"""N-way spherical merges from mergekit (arcee-ai/mergekit a6e4028, `merge_methods/karcher.py`,
`multislerp.py`; merge-reference/lora-reference §6), each whole tensor one point."""
from __future__ import annotations

import math

import torch

from ..errors import BadParameterError
from .basic import MODEL_WEIGHTS, parse_model_weights
from .median import serial_torch
from .registry import KeyContext, Param, merge_method
from .sparsify import chunks
from .task_vector import difference, lazy_inputs, load

TOL = Param("tol", float, 1e-5, "Karcher: stop when the tangent step's norm is below tol; norms ≤ tol count as zero", 0.0, 1.0)
MAX_ITER = Param("max_iter", int, 10, "Karcher: most fixed-point iterations", 1, 10000)
NORMALIZE = Param("normalize_weights", bool, True, "multislerp: divide the weights by their sum")
USE_BASE = Param("use_base", bool, False, "multislerp: A is a base subtracted from B, C, … (task vectors), not a point")


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm()


# N unit directions, the iterate, its tangent step and one scratch vector, all fp32; each input
# is mapped only while its direction is made.
def _karcher_copies(n: int) -> float:
    return n + 3


@merge_method("karcher", inputs=("A", "B"), params=(MODEL_WEIGHTS, TOL, MAX_ITER), variadic=True,
              reference="https://github.com/arcee-ai/mergekit")
@lazy_inputs(_karcher_copies)
def karcher(*models, ctx: KeyContext, model_weights: str, tol: float, max_iter: int) -> torch.Tensor:
    """Karcher (Fréchet) mean on the sphere: directions uᵢ = θᵢ/‖θᵢ‖ averaged by the fixed point
    u ← exp_u(Σwᵢ log_u(uᵢ)), scaled by Σwᵢ‖θᵢ‖ (mergekit `karcher`; weights equal by default,
    normalised). Identical models give that model; two give their slerp at w_B."""
    w = parse_model_weights(model_weights, len(models))
    shape: torch.Size | None = None
    norms: list[float] = []
    live: list[tuple[float, torch.Tensor]] = []
    for wi, model in zip(w, models):
        mapped = load(model)
        shape = mapped.shape
        # fp32 from the engine's fp16/bf16/fp32 inputs; a caller's fp64 stays fp64
        x = mapped.reshape(-1).to(torch.promote_types(mapped.dtype, torch.float32), copy=True)
        del mapped  # unmaps the input before the next one is read
        norm = float(x.norm())
        norms.append(norm)
        if norm > tol:
            live.append((wi, x.div_(norm)))
    assert shape is not None
    out_norm = sum(wi * n for wi, n in zip(w, norms))  # zero-norm models still count here
    if not live:
        return torch.zeros(shape, dtype=x.dtype)
    total = sum(wi for wi, _ in live)
    live = [(wi / total, u) for wi, u in live]
    scratch = torch.empty_like(live[0][1])
    # in place, with the same roundings as the plain expressions: Σwᵢuᵢ, uᵢ − cos·u, cos·u + sin·s/‖s‖
    u = torch.mul(live[0][1], live[0][0])
    for wi, ui in live[1:]:
        u.add_(torch.mul(ui, wi, out=scratch))
    if float(u.norm()) >= tol:
        u.div_(u.norm())
    else:
        u.copy_(live[0][1])
    step = torch.empty_like(u)
    for _ in range(max_iter):
        step.zero_()
        for wi, ui in live:
            cos = float(torch.dot(u, ui).clamp(-1.0, 1.0))
            theta = math.acos(cos)
            if theta < tol:
                continue
            torch.sub(ui, torch.mul(u, cos, out=scratch), out=scratch)
            step.add_(scratch, alpha=wi * theta / math.sin(theta))
        size = float(step.norm())
        if size < tol:
            break
        u.mul_(math.cos(size)).add_(step.mul_(math.sin(size)).div_(size))
        u.div_(u.norm())
    return u.mul_(out_norm).reshape(shape)


karcher.working_set = "N unit directions, the iterate, its step and a scratch vector; one input mapped at a time"  # type: ignore[attr-defined]


# Three fp32 vectors whatever N: the mean direction, the tangent and one input's direction. Each
# direction is made again from its input when the tangent needs it (the inputs are read twice)
# rather than all N being held, so that the cost per input is flat in N.
def _multislerp_copies(n: int) -> float:
    return 3


@merge_method("multislerp", inputs=("A", "B"), params=(MODEL_WEIGHTS, NORMALIZE, USE_BASE), variadic=True,
              reference="https://github.com/arcee-ai/mergekit")
@lazy_inputs(_multislerp_copies)
def multislerp(*models, ctx: KeyContext, model_weights: str, normalize_weights: bool,
               use_base: bool) -> torch.Tensor:
    """N-way spherical interpolation (mergekit `multislerp`): xᵢ = θᵢ (− A with use_base), unit
    directions uᵢ, mean direction m̂ of Σwᵢuᵢ, tangent T = Σwᵢ(uᵢ − ⟨uᵢ,m̂⟩m̂) (a projection,
    not the log map); result (base +) Σwᵢ‖xᵢ‖·(cos‖T‖·m̂ + sin‖T‖·T/‖T‖). Two models: close to,
    not exactly, slerp (the projection differs from the log map away from the midpoint)."""
    eps = 1e-8
    base = models[0] if use_base else None
    points = models[1:] if use_base else models
    if not points:
        raise BadParameterError("multislerp with use_base needs models B, C, … besides the base A")
    if normalize_weights or not model_weights.strip():
        w = parse_model_weights(model_weights, len(points))
    else:
        w = [float(v) for v in model_weights.split(",")]
        if len(w) != len(points):
            raise BadParameterError(f"multislerp: model_weights has {len(w)} values for {len(points)} models")
    with serial_torch():
        return _multislerp(points, base, w, eps)


def _point(source, base) -> torch.Tensor:
    """xᵢ as a new flat tensor (fp32, or wider when an input is)."""
    if base is not None:
        return difference(load(source), load(base))
    x = load(source)
    return x.reshape(-1).to(torch.promote_types(x.dtype, torch.float32), copy=True)


def _multislerp(points, base, w: list[float], eps: float) -> torch.Tensor:
    # The sums run in the formula's order, chunk by chunk: Python's sum() starts from the integer
    # 0, and 0 + (−0.0) is +0.0, so the first term gets "+ 0" too — it can flip a zero's sign bit.
    shape = points[0].shape
    norms: list[float] = []
    m: torch.Tensor | None = None
    for i, source in enumerate(points):
        u = _point(source, base)
        norms.append(float(u.norm()))
        u.div_(norms[-1] + eps)
        if m is None:
            m = torch.empty_like(u)
        for part in chunks(u.numel()):
            term = torch.mul(u[part], w[i])
            if i == 0:
                m[part].copy_(term.add_(0))
            else:
                m[part].add_(term)
        del u
    assert m is not None
    n = m.numel()
    if float(m.norm()) < eps:
        if len(points) != 2:
            raise BadParameterError("multislerp: the directions cancel out (their weighted mean is 0)")
        # w₀x₀ + w₁x₁ (+ A, or + 0), into m's buffer
        x0 = _point(points[0], base)
        for part in chunks(n):
            m[part].copy_(torch.mul(x0[part], w[0]))
        del x0
        x1 = _point(points[1], base)
        for part in chunks(n):
            m[part].add_(torch.mul(x1[part], w[1]))
        del x1
        return _plus_base(m, base).view(shape)
    m_hat = m.div_(m.norm())
    tangent = torch.empty_like(m_hat)
    for i, source in enumerate(points):
        u = _point(source, base).div_(norms[i] + eps)  # uᵢ again, bit for bit
        along = torch.dot(u, m_hat)
        for part in chunks(n):
            term = torch.sub(u[part], along * m_hat[part]).mul_(w[i])
            if i == 0:
                tangent[part].copy_(term.add_(0))
            else:
                tangent[part].add_(term)
        del u
    size = float(tangent.norm())
    scale = sum(wi * n_i for wi, n_i in zip(w, norms))
    if size < eps:
        out = m_hat.mul_(scale)
    else:
        cos, sin = math.cos(size), math.sin(size)
        for part in chunks(n):
            bent = torch.mul(tangent[part], sin).div_(size)
            tangent[part].copy_(torch.mul(m_hat[part], cos).add_(bent)).mul_(scale)
        out = tangent
    del m_hat, m
    return (_plus_base(out, base) if base is not None else out).view(shape)


def _plus_base(out: torch.Tensor, base) -> torch.Tensor:
    """out + A in place, chunk by chunk (or + 0 without a base, as the formula has it)."""
    if base is None:
        return out.add_(0)
    flat = load(base).reshape(-1)
    for part in chunks(out.numel()):
        out[part].add_(flat[part])
    return out


multislerp.working_set = "the mean direction, the tangent and one input's direction; each input read twice"  # type: ignore[attr-defined]
