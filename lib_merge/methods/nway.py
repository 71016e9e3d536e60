"""N-way spherical merges from mergekit (arcee-ai/mergekit a6e4028, `merge_methods/karcher.py`,
`multislerp.py`; merge-reference/lora-reference §6), each whole tensor one point."""
from __future__ import annotations

import math

import torch

from ..errors import BadParameterError
from .basic import MODEL_WEIGHTS, parse_model_weights
from .registry import KeyContext, Param, merge_method
from .task_vector import lazy_inputs, load

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


@merge_method("multislerp", inputs=("A", "B"), params=(MODEL_WEIGHTS, NORMALIZE, USE_BASE), variadic=True,
              reference="https://github.com/arcee-ai/mergekit")
def multislerp(*models: torch.Tensor, ctx: KeyContext, model_weights: str, normalize_weights: bool,
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
    xs = [(p - base if base is not None else p).reshape(-1) for p in points]
    norms = [float(x.norm()) for x in xs]
    us = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(wi * ui for wi, ui in zip(w, us))
    if float(m.norm()) < eps:
        if len(xs) == 2:
            out = w[0] * xs[0] + w[1] * xs[1]
            return (out.reshape(points[0].shape) + (base if base is not None else 0))
        raise BadParameterError("multislerp: the directions cancel out (their weighted mean is 0)")
    m_hat = m / m.norm()
    tangent = sum(wi * (ui - torch.dot(ui, m_hat) * m_hat) for wi, ui in zip(w, us))
    size = float(tangent.norm())
    direction = m_hat if size < eps else math.cos(size) * m_hat + math.sin(size) * tangent / size
    out = (sum(wi * n for wi, n in zip(w, norms)) * direction).reshape(points[0].shape)
    return out + base if base is not None else out
