"""Console lines of the Untitled Guidance script, shared by every guidance module of both hosts.

The WebUI console is the only place a sampling hook can tell the user that a method was skipped,
and a hook runs every step: ``log_once`` keeps such a line to one per generation.
"""
from __future__ import annotations

TITLE = "Untitled Guidance"

_logged: set[str] = set()


def log(message: str) -> None:
    print(f"[{TITLE}] {message}", flush=True)


def log_once(message: str) -> None:
    """One line per generation for things that would otherwise repeat every step."""
    if message not in _logged:
        _logged.add(message)
        log(message)


def line_once(line: str) -> None:
    """``log_once`` for a line that already carries our prefix (the proof-of-effect lines)."""
    if line not in _logged:
        _logged.add(line)
        print(line, flush=True)


def new_generation() -> None:
    _logged.clear()
