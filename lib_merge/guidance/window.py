"""Step windows shared by every guider: when in the sampling run a method is active.

Convention (the one ``GuidanceSettings`` documents): a bound that is a float strictly between 0
and 1, or exactly ``1.0`` given as a float, is a fraction of the run, measured as
``step / (total_steps - 1)`` like Forge's built-ins; any other value is a 0-based step index, as
incantations writes them. Both ends are inclusive, and an end at or beyond the last step (the
2048 sentinel included) means "to the end".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BadParameterError

# Float comparisons of fractions against step/(n-1) must not lose a step to rounding
# (0.3 * 10 is 3.0000000000000004).
_EPS = 1e-9


def is_fraction(bound: float) -> bool:
    """True when ``bound`` is read as a fraction of the run rather than as a step index."""
    if isinstance(bound, bool):
        return False
    if isinstance(bound, float):
        return (0.0 < bound < 1.0) or bound == 1.0
    return False


def progress(step: int, total_steps: int) -> float:
    """Position of ``step`` in the run, 0 at the first step and 1 at the last."""
    # A one-step run has only a first step: without this guard the ratio divides by zero.
    if total_steps <= 1:
        return 0.0
    return step / (total_steps - 1)


@dataclass(frozen=True)
class StepWindow:
    """Inclusive window ``[start, end]`` of sampler steps; see the module docstring."""

    start: float = 0.0
    end: float = 2048.0

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadParameterError(f"window {name}={value!r}: expected a number (step index or fraction)")
            if math.isnan(value) or value < 0:
                raise BadParameterError(f"window {name}={value!r}: must be >= 0")

    def _after_start(self, step: int, total_steps: int) -> bool:
        if is_fraction(self.start):
            return progress(step, total_steps) >= self.start - _EPS
        return step >= self.start

    def _before_end(self, step: int, total_steps: int) -> bool:
        if is_fraction(self.end):
            return progress(step, total_steps) <= self.end + _EPS
        # An end index at or past the last step (2048) covers the rest of the run by itself.
        return step <= self.end

    def contains(self, step: int, total_steps: int) -> bool:
        """Whether 0-based ``step`` of a ``total_steps`` run lies inside the window."""
        if step < 0 or (total_steps > 0 and step >= total_steps):
            return False
        return self._after_start(step, total_steps) and self._before_end(step, total_steps)

    def steps(self, total_steps: int) -> list[int]:
        """All steps of a ``total_steps`` run inside the window (for UI hints and tests)."""
        return [i for i in range(total_steps) if self.contains(i, total_steps)]
