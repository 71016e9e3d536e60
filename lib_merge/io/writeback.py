"""What the writer does with finished ranges while the merge is still running.

The writer's workers ``pwrite`` tensors at fixed offsets, in any order. One background thread
(``Tail``) follows them:

* **write-back** — every finished range is handed to the kernel with
  ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` at once, so the disk writes while the merge computes.
  Without it the kernel starts writing only past ``dirty_background_ratio`` (10 % of RAM: the
  whole of a 2 GB output on a 24 GB machine), and the final ``fsync`` waits for all of it. This
  only *starts* write-back; durability still comes from the writer's final ``fsync``. Where the
  call does not exist (macOS, Windows) or the filesystem refuses it, nothing is started early and
  the final ``fsync`` does it all, as before.
* **sha256 in file order** — the contiguous finished prefix is read back (from the page cache,
  where ``pwrite`` just put it) and hashed while later keys are still being merged; the final
  stretch is hashed while the writer's ``fsync`` runs. The digest is therefore of the bytes the
  file holds, read through the filesystem, exactly what ``sha256_file`` would compute after the
  rename — without a separate pass over the output.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import sys
import threading
from typing import Callable, Optional

_BLOCK = 8 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h; start write-back of dirty pages, do not wait


def _find_sync_file_range() -> Optional[Callable[[int, int, int, int], None]]:
    """``os.sync_file_range``, or libc's through ctypes (some Python builds leave it out);
    None off Linux. Both release the GIL."""
    native = getattr(os, "sync_file_range", None)
    if native is not None:
        return native
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int

    def call(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if fn(fd, offset, nbytes, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return call


sync_file_range = _find_sync_file_range()


class Tail:
    """Starts write-back of finished ranges (``flush``) and hashes the finished prefix in file
    order (``hash``). ``done(start, end)`` may be called from any thread, in any order; ``close``
    waits for the hash of everything up to ``total``."""

    def __init__(self, fd: int, total: int, *, flush: bool, hash: bool):
        self._fd = fd
        self._total = total
        self._flush = flush and sync_file_range is not None
        self._hash = hashlib.sha256() if hash else None
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int]] = []  # finished, not yet handed to write-back
        self._ahead: dict[int, int] = {}  # finished ranges past the prefix: start → end
        self._prefix = 0  # every byte below is finished
        self._hashed = 0
        self._closing = False
        self._stopped = False
        self.error: Optional[OSError] = None
        self._thread = threading.Thread(target=self._run, name="lib_merge-tail", daemon=True)
        self._thread.start()

    def done(self, start: int, end: int) -> None:
        if end <= start:
            return
        with self._cond:
            if self._flush:
                self._pending.append((start, end))
            if start == self._prefix:
                self._prefix = end
                while self._prefix in self._ahead:
                    self._prefix = self._ahead.pop(self._prefix)
            else:
                self._ahead[start] = end
            self._cond.notify()

    def close(self) -> Optional[str]:
        """Wait until the whole file is hashed; the hex digest (None when not hashing). Raises
        the OSError a read-back met, or reports a file shorter than planned."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self.error is not None:
            raise self.error
        if self._hash is None:
            return None
        if self._hashed != self._total:
            raise OSError(errno.EIO, f"only {self._hashed} of {self._total} bytes were finished")
        return self._hash.hexdigest()

    def stop(self) -> None:
        """Abandon the work (the merge failed or was cancelled); returns once the thread is out
        of the file, so the caller may close it."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        buf = bytearray(_BLOCK) if self._hash is not None else None
        while True:
            with self._cond:
                while not self._stopped and not self._pending and not self._hash_due():
                    if self._closing:
                        return
                    self._cond.wait()
                if self._stopped:
                    return
                pending, self._pending = self._pending, []
                prefix = self._prefix
            self._start_write_back(pending)
            if self._hash_due(prefix) and buf is not None:
                if not self._hash_block(buf, prefix):
                    return

    def _hash_due(self, prefix: Optional[int] = None) -> bool:
        return self._hash is not None and self._hashed < (self._prefix if prefix is None else prefix)

    def _hash_block(self, buf: bytearray, prefix: int) -> bool:
        """Hash one block of the finished prefix; False after an error (kept for ``close``)."""
        want = min(len(buf), prefix - self._hashed)
        view = memoryview(buf)[:want]
        try:
            got = 0
            while got < want:
                n = os.preadv(self._fd, [view[got:]], self._hashed + got)
                if n <= 0:
                    raise OSError(errno.EIO, f"the file ends at {self._hashed + got} bytes, "
                                  f"{self._total} were written")
                got += n
        except OSError as exc:
            self.error = exc
            return False
        self._hash.update(view)
        self._hashed += want
        return True

    def _start_write_back(self, ranges: list[tuple[int, int]]) -> None:
        if not self._flush or not ranges:
            return
        ranges.sort()
        merged = [list(ranges[0])]
        for start, end in ranges[1:]:
            if start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            try:
                sync_file_range(self._fd, start, end - start, SYNC_FILE_RANGE_WRITE)
            except OSError:
                # a filesystem without it (EINVAL, ESPIPE, ENOSYS): the final fsync does it all;
                # a real I/O error is reported by that fsync too
                self._flush = False
                return
