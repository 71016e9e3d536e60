"""Resume files: what a long merge has durably written, so ``merge --resume`` can continue it.

Beside ``OUT.safetensors.tmp`` (the partial output, whose header is fixed by the plan) lives
``OUT.safetensors.resume``, JSON lines:
    {"format": "lib_merge-resume", "version": 1, "header_sha256": …, "inputs": [[path, size, mtime_ns], …],
     "recipe": {…}, "threads": …, "max_memory": …}                       first line: what is being merged
    {"done": ["key", …]}                                                   then one line per flush
A key is appended only after the temporary file was fsynced with its bytes in it, so after a
crash, a power loss or Ctrl-C every listed key is on disk; keys in flight are simply redone.
Every key's bytes are a pure function of the plan (per-key seeds, no thread-order effects), so a
resumed file is bit for bit the file an uninterrupted run writes. The header digest covers the
recipe, the input hashes and every shape and dtype; the input fingerprints (size, mtime) catch a
swapped input when hashing is off.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import OutputPathError, ResumeError

FORMAT = "lib_merge-resume"
VERSION = 1
FLUSH_SECONDS = 5.0
# Merges reading at least this much write a resume file unless told otherwise (`--resume-file`).
AUTO_MIN_BYTES = 8 << 30


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".resume")


def fingerprints(paths: Iterable[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def read_header(output: Path) -> dict[str, Any]:
    """The first line of OUT's resume file (to find the recipe of an interrupted merge)."""
    path = journal_path(output)
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        header = json.loads(first)
    except FileNotFoundError:
        raise ResumeError(f"{output}: no resume file {path.name} — nothing to resume; run the merge without --resume") from None
    except (OSError, ValueError) as exc:
        raise ResumeError(f"{path}: unreadable resume file ({exc}); delete it and {output.name}.tmp and start over") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ResumeError(f"{path}: not a lib_merge resume file (version {VERSION}); delete it and start over")
    return header


class Journal:
    def __init__(self, output: Path, header_bytes: bytes, inputs: Sequence[Path], recipe: dict, extra: dict[str, Any]):
        self.path = journal_path(output)
        self.output = output
        self.header = {
            "format": FORMAT,
            "version": VERSION,
            "header_sha256": hashlib.sha256(header_bytes).hexdigest(),
            "inputs": fingerprints(inputs),
            "recipe": recipe,
            **extra,
        }
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._fd = -1

    # -- resume --------------------------------------------------------------------------------
    def completed(self) -> set[str]:
        """Keys recorded by an earlier run of this same plan (checked), or an error."""
        previous = read_header(self.output)
        if previous.get("header_sha256") != self.header["header_sha256"]:
            raise ResumeError(
                f"{self.path}: the interrupted merge had another recipe, inputs or output layout; "
                f"run the same command again, or delete {self.path.name} and {self.output.name}.tmp to start over"
            )
        before = {x[0]: x for x in previous.get("inputs", [])}
        for now in self.header["inputs"]:
            old = before.get(now[0])
            if old is not None and old != now:
                raise ResumeError(
                    f"{now[0]}: changed since the interrupted merge (size or modification time); "
                    f"delete {self.path.name} and {self.output.name}.tmp to start over"
                )
        done: set[str] = set()
        with open(self.path, encoding="utf-8") as f:
            f.readline()
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # a torn last line after a crash: everything before it is valid
                done.update(entry.get("done", ()))
        return done

    def open(self, *, keep: bool) -> None:
        """Start the file (or, resuming, append to it)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if not keep:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(json.dumps(self.header) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            with contextlib.suppress(OSError):  # best effort: the first error is the one to report
                tmp.unlink()
            raise OutputPathError(
                f"{self.path}: cannot write the resume file ({exc.strerror or exc}); free space or choose a "
                "writable folder, or pass --resume-file off"
            ) from None

    # -- recording -----------------------------------------------------------------------------
    def record(self, key: str) -> None:
        with self._lock:
            self._pending.append(key)

    def due(self) -> bool:
        return time.monotonic() - self._last_flush >= FLUSH_SECONDS

    def flush(self, sync_data) -> None:
        """Make the data durable (``sync_data``), then list the keys it contains."""
        with self._lock:
            keys, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if not keys or self._fd < 0:
            return
        sync_data()
        try:
            os.write(self._fd, (json.dumps({"done": keys}) + "\n").encode("utf-8"))
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputPathError(
                f"{self.path}: cannot update the resume file ({exc.strerror or exc}); free space in "
                f"{self.path.parent}, or pass --resume-file off"
            ) from None

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # called on the way out of a failure, too
                os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """After a finished merge: its output is complete, so a resume file that cannot be removed
        is left (the next merge to this name asks for --overwrite) rather than failing the merge."""
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
