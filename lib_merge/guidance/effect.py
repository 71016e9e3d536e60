"""Proof of effect: did each active guidance method change the guided prediction?

The most common complaint about guidance extensions is "enabled but no effect": a hook the host
never calls, a host update that replaced the modules, a scale that makes the method an identity.
So at the first sampler step of a pass in which a method is active, the stack checks it:

* methods the stack applies itself (the combiners, PAG and SEG terms, dynamic thresholding, CFG
  rescale, the CFG interval) are measured for free from rows the step already has: max |ΔD|
  between D with and without the method;
* methods that act inside the U-Net (NAG, FreeU) report from their hooks, which count the calls
  that reached them and, for NAG, the largest change they made to the attention output. A hook
  that was never reached is named as such.

A change counts when max |ΔD| exceeds the rounding noise of the prediction's dtype relative to
its size (``noise_floor``): a disconnected PAG hook leaves its rows equal to the cond rows up to
the U-Net's batching noise, which must not pass for an effect. ``EffectReport`` keeps one
``MethodCheck`` per method; host adapters print ``console_line`` for each new failure and write
``INFOTEXT_KEY: infotext_value()`` into the infotext.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INFOTEXT_KEY = "Guidance check"
CONSOLE_PREFIX = "[Untitled Guidance]"


def noise_floor(reference: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """The largest |ΔD| that is still rounding noise for predictions like ``reference``."""
    dtype = dtype or reference.dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return max(1e-5, 32 * eps) * max(scale, 1e-3)


@dataclass
class MethodCheck:
    method: str
    acted: bool | None = None  # None: not checked yet
    max_change: float = 0.0
    reason: str = ""

    @property
    def text(self) -> str:
        """``<method> had no effect`` (the infotext form)."""
        return f"{self.method} had no effect"

    @property
    def console_line(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{CONSOLE_PREFIX} {INFOTEXT_KEY}: {self.text}{why}"


class EffectReport:
    """Checks of one sampling pass, one per active method, resolved at its first active step."""

    def __init__(self, methods):
        self.checks = {m: MethodCheck(m) for m in methods}
        self._hooks: dict[str, tuple[bool, float | None, float | None, str]] = {}
        self._handed_out: set[str] = set()

    def pending(self, method: str) -> bool:
        check = self.checks.get(method)
        return check is not None and check.acted is None

    @property
    def any_pending(self) -> bool:
        return any(c.acted is None for c in self.checks.values())

    def resolve(self, method: str, acted: bool, max_change: float = 0.0, reason: str = "") -> None:
        """Record the verdict of ``method`` (only the first verdict counts)."""
        if self.pending(method):
            self.checks[method] = MethodCheck(method, bool(acted), float(max_change), "" if acted else reason)

    def measure(self, method: str, before: torch.Tensor, after: torch.Tensor, reason: str) -> None:
        """Resolve ``method`` from D without (``before``) and with it (``after``)."""
        if not self.pending(method):
            return
        change = float((after.detach().float() - before.detach().float()).abs().max()) if after.numel() else 0.0
        floor = noise_floor(before, after.dtype)
        hook = self._hooks.get(method)
        if change <= floor and hook is not None and not hook[0]:
            reason = hook[3]
        self.resolve(method, change > floor, change, f"max |ΔD| = {change:.3g}: {reason}")

    def note_hook(self, method: str, *, reached: bool, max_change: float | None = None,
                  reference: float | None = None, reason: str = "") -> None:
        """What a U-Net hook saw in the forwards of this step.

        For a method measured by the stack (PAG, SEG) this only supplies the reason if it did
        not act; for a method only the hook sees (NAG, FreeU) it resolves the check: acted when
        reached and, where a change was measured, the change exceeds the noise floor of
        ``reference`` (the largest magnitude it was compared with).
        """
        if not reached:
            # ``reason`` explains a reached hook that changed nothing; unreached says more.
            reason = "its hook was not reached: the host replaced the layers or the hook was removed"
        self._hooks[method] = (reached, max_change, reference, reason)

    def resolve_hooks(self, methods) -> None:
        """Resolve hook-only ``methods`` from what ``note_hook`` recorded in this step."""
        for method in methods:
            if not self.pending(method) or method not in self._hooks:
                continue
            reached, change, reference, reason = self._hooks.pop(method)
            if not reached:
                self.resolve(method, False, 0.0, reason)
            elif change is None:
                self.resolve(method, True, 0.0)
            else:
                floor = max(1e-5, 32 * torch.finfo(torch.float32).eps) * max(reference or 0.0, 1e-3)
                self.resolve(method, change > floor, change, f"max |ΔZ| = {change:.3g} in its layers: {reason}")

    def finish(self) -> None:
        """End of the pass: a method never checked was never active."""
        for method, check in self.checks.items():
            if check.acted is None:
                self.checks[method] = MethodCheck(method, False, 0.0, "not active at any step of this pass")

    def failures(self) -> list[MethodCheck]:
        return [c for c in self.checks.values() if c.acted is False]

    def new_failures(self) -> list[MethodCheck]:
        """Failures not handed out before (print each once)."""
        out = [c for c in self.failures() if c.method not in self._handed_out]
        self._handed_out.update(c.method for c in out)
        return out

    def infotext_value(self) -> str | None:
        """``"NAG had no effect; PAG had no effect"``, or None when every check passed."""
        texts = [c.text for c in self.failures()]
        return "; ".join(texts) if texts else None
