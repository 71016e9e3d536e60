"""Typed errors. Every message names the file, key or parameter, the bad value and the fix.

All inherit from ``MergeError`` so a CLI or UI can catch one type and print ``str(err)`` as a
single line; ``ValueError`` is mixed in where the cause is a bad user value, so generic callers
that validate input keep working.
"""
from __future__ import annotations


class MergeError(Exception):
    """Base class: the message is one line a user can act on."""


class CorruptFileError(MergeError):
    """A checkpoint that cannot be parsed: truncated, bad header, offsets out of range."""


class UnsafePickleError(MergeError):
    """A pickle that references a global outside the allowlist; nothing from it was executed."""


class UnknownArchitectureError(MergeError):
    """The key set matches no supported architecture."""


class ArchitectureMismatchError(MergeError):
    """Inputs of different architectures, or shapes that cannot be merged."""


class BadBlockWeightsError(MergeError, ValueError):
    """A block-weight string/list that cannot be parsed for this architecture."""


class UnknownMethodError(MergeError, ValueError):
    """A merge method name that is not registered."""


class BadParameterError(MergeError, ValueError):
    """A method, guidance or CLI parameter out of range or of the wrong type."""


class RecipeError(MergeError, ValueError):
    """A recipe that cannot be read or validated."""


class OutputPathError(MergeError):
    """An output that would overwrite an input or an existing file, or escapes its folder."""


class MergeCancelled(MergeError):
    """The merge was cancelled; no file was left under the final name."""


class NonFiniteError(MergeError):
    """NaN or Inf found in an input tensor or produced by a method."""


class MemoryBudgetError(MergeError, ValueError):
    """A ``--max-memory`` cap too small for the largest key of the plan (names the key and the need)."""


class ResumeError(MergeError):
    """A resume file that does not belong to this merge (other inputs, recipe or output)."""


class SoupError(MergeError, ValueError):
    """A soup (pot) operation that cannot be done: wrong architecture, not a member, duplicate."""


class CorruptPotError(SoupError, CorruptFileError):
    """A pot whose manifest or sums fail their checks; nothing was changed."""
