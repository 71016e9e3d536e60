"""Streaming safetensors writer.

The header is computed from the planned keys, shapes and dtypes before any tensor exists, so
each tensor has a fixed offset and can be written with ``pwrite`` the moment it is produced, in
any order and from any thread. The file is written as ``NAME.tmp`` beside the output, space is
reserved up front (a full disk fails before the merge, not after an hour), and the final name
appears only after every key was written, the file was fsync'd (``durable``) and it read back
as planned; a kill at any point leaves at most ``NAME.tmp``, never a file under the final name.

While the merge runs, each finished key is handed to write-back at once and the finished prefix
of the file is read back in order and hashed (``writeback.Tail``), so the final ``fsync`` finds
little left and the output's sha256 needs no separate pass.

What ``finish`` verifies, and why no second full read: after the last ``fsync`` and ``close``
(NFS and some FUSE mounts report a failed write-back only there) the header is re-read and must
equal the bytes written byte for byte, and the file must have exactly the planned size and keys —
this is what catches a file damaged, truncated or replaced between the writes and the rename.
The data itself is read back once, by the hasher, from the page cache: a read error or a file
shorter than planned fails the merge there. A checksum of each part compared with that read
would not add anything on a local filesystem (the page cache holds exactly the bytes ``pwrite``
copied, so it always matches) and would cost a CPU pass over the whole output; a failing disk is
reported by ``fsync``, which is checked.
"""
from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import CorruptFileError, MergeError, OutputPathError
from .dtypes import TORCH_TO_CODE, itemsize
from .writeback import Tail


class PlannedTensor:
    __slots__ = ("key", "shape", "dtype", "offset", "nbytes")

    def __init__(self, key: str, shape: Sequence[int], dtype: torch.dtype):
        self.key = key
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        numel = 1
        for d in self.shape:
            numel *= d
        self.nbytes = numel * itemsize(TORCH_TO_CODE[dtype])
        self.offset = 0


def temp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_output_path(path: Path, inputs: Iterable[Path] = (), *, overwrite: bool = False) -> None:
    """Refuse to write over an input (even through another name) or, without ``overwrite``, over
    an existing file."""
    for src in inputs:
        try:
            same = path.exists() and os.path.samefile(path, src)
        except OSError:
            same = False
        if same or path.resolve() == Path(src).resolve():
            raise OutputPathError(f"{path}: this is an input of the merge ({src}); choose another output name")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path}: already exists; pass --overwrite to replace it or choose another name")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: folder {path.parent} does not exist; create it first")


def plan_layout(
    planned: Sequence[tuple[str, Sequence[int], torch.dtype]], metadata: Mapping[str, str] | None, path: Path
) -> tuple[dict[str, PlannedTensor], bytes]:
    """Offsets of every planned tensor and the exact header bytes (8-byte length + JSON, padded):
    a pure function of the plan, so a resumed run can check it before touching any file."""
    tensors: dict[str, PlannedTensor] = {}
    for key, shape, dtype in planned:
        if key in tensors:
            raise MergeError(f"{path}: key {key!r} planned twice")
        tensors[key] = PlannedTensor(key, shape, dtype)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    cursor = 0
    for t in tensors.values():
        t.offset = cursor
        header[t.key] = {"dtype": TORCH_TO_CODE[t.dtype], "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        cursor += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    return tensors, len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    def __init__(
        self,
        path: str | os.PathLike[str],
        planned: Sequence[tuple[str, Sequence[int], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
        *,
        inputs: Iterable[os.PathLike[str] | str] = (),
        overwrite: bool = False,
        resume: bool = False,
        durable: bool = True,
        hash_output: bool = False,
    ):
        self.durable = durable
        self.sha256: str | None = None  # of the whole file, after finish() (hash_output=True)
        self.path = Path(path)
        self.tmp_path = temp_path_for(self.path)
        check_output_path(self.path, [Path(p) for p in inputs], overwrite=overwrite)
        self.tensors, self._header = plan_layout(planned, metadata, self.path)
        self.data_start = len(self._header)
        self.total_size = self.data_start + sum(t.nbytes for t in self.tensors.values())
        self.resumed = False  # True when an interrupted run's bytes were kept (resume=True)
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._fd = -1
        self._open(resume)
        self._tail: Tail | None = None
        if durable or hash_output:
            self._tail = Tail(self._fd, self.total_size, flush=durable, hash=hash_output)
            self._tail.done(0, self.data_start)  # the header, written by _open

    # -- lifecycle -------------------------------------------------------------------------------
    def _open(self, resume: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT
        if not resume:
            flags |= os.O_TRUNC
        try:
            self._fd = os.open(self.tmp_path, flags, 0o644)
            existing = os.fstat(self._fd).st_size
            if resume and existing == self.total_size and os.pread(self._fd, len(self._header), 0) == self._header:
                self.resumed = True
                return  # same plan as the interrupted run: keep the bytes already written
            os.ftruncate(self._fd, 0)
            _reserve(self._fd, self.total_size, self.path)
            os.pwrite(self._fd, self._header, 0)
        except OSError as exc:
            self._cleanup()
            raise _disk_error(exc, self.path, self.total_size) from None
        except BaseException:
            self._cleanup()
            raise

    @property
    def header_bytes(self) -> bytes:
        return self._header

    def sync(self) -> None:
        """Make every byte written so far durable (the resume file lists keys only after this)."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _disk_error(exc, self.path, self.total_size) from None

    def mark_written(self, keys: Iterable[str]) -> None:
        """Resume support: declare keys whose bytes are already in the temporary file."""
        with self._lock:
            fresh = [k for k in keys if k not in self._written]
            self._written.update(fresh)
        for key in fresh:
            self._finished(key)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        planned = self._planned(key)
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise MergeError(
                f"{self.path}: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}"
            )
        self.write_part(key, 0, tensor)
        self.complete(key)

    def write_part(self, key: str, element_offset: int, chunk: torch.Tensor) -> None:
        """Write ``chunk`` (any shape, the planned dtype) at ``element_offset`` within ``key``: lets
        a producer stream a tensor through a small buffer without ever materialising it."""
        planned = self._planned(key)
        if chunk.dtype != planned.dtype:
            raise MergeError(f"{self.path}: {key!r} chunk is {chunk.dtype}, planned {planned.dtype}")
        data = chunk.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        start = element_offset * chunk.element_size()
        if start + data.numel() > planned.nbytes:
            raise MergeError(f"{self.path}: write past the end of {key!r}")
        if not data.numel():
            return
        view = memoryview(data.numpy())
        pos = self.data_start + planned.offset + start
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], pos + done)
        except OSError as exc:
            raise _disk_error(exc, self.path, self.total_size) from None

    def complete(self, key: str) -> None:
        """Declare every byte of ``key`` written."""
        self._planned(key)
        with self._lock:
            if key in self._written:
                return
            self._written.add(key)
        self._finished(key)

    def _finished(self, key: str) -> None:
        if self._tail is not None:
            planned = self.tensors[key]
            start = self.data_start + planned.offset
            self._tail.done(start, start + planned.nbytes)

    def _planned(self, key: str) -> PlannedTensor:
        planned = self.tensors.get(key)
        if planned is None:
            raise MergeError(f"{self.path}: key {key!r} was not planned")
        return planned

    @property
    def missing(self) -> list[str]:
        return [k for k in self.tensors if k not in self._written]

    def finish(self) -> Path:
        """Flush, verify the header reads back, then atomically move to the final name."""
        missing = self.missing
        if missing:
            self.abort()
            raise MergeError(f"{self.path}: {len(missing)} keys were never written (first: {missing[0]!r})")
        try:
            if self.durable:
                os.fsync(self._fd)  # runs while the hasher reads the last keys
            if self._tail is not None:
                tail, self._tail = self._tail, None
                self.sha256 = tail.close()
        except OSError as exc:
            self.abort()
            raise _disk_error(exc, self.path, self.total_size) from None
        try:
            os.close(self._fd)
        except OSError as exc:  # NFS and some FUSE mounts report a failed write-back only here
            self._fd = -1
            self.abort()
            raise _disk_error(exc, self.path, self.total_size) from None
        self._fd = -1
        self._verify()
        try:
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise _disk_error(exc, self.path, self.total_size) from None
        if self.durable:
            _fsync_dir(self.path.parent)
        return self.path

    def _verify(self) -> None:
        from .reader import SafetensorsReader

        try:
            with open(self.tmp_path, "rb") as f:
                header = f.read(len(self._header))
            if header != self._header:  # byte-exact: a flipped dtype or shape still parses
                raise CorruptFileError("its header differs from the one written")
            with SafetensorsReader(self.tmp_path) as check:
                if set(check.infos) != set(self.tensors) or check.file_size != self.total_size:
                    raise CorruptFileError(f"{check.file_size} bytes, {len(check.infos)} keys; planned "
                                           f"{self.total_size} bytes, {len(self.tensors)} keys")
        except (CorruptFileError, OSError) as exc:
            self.abort()
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise CorruptFileError(
                f"{self.path}: the written file did not read back as planned ({reason}); the disk or "
                "filesystem may be failing — no file was written"
            ) from None

    def abort(self) -> None:
        self._cleanup()

    def _stop_tail(self) -> None:
        tail, self._tail = getattr(self, "_tail", None), None
        if tail is not None:
            tail.stop()  # out of the file before it is closed

    def _cleanup(self) -> None:
        """Best effort: runs while another error is on its way up, which must stay the one
        reported (a read-only folder refuses even the unlink of a file that was never made)."""
        self._stop_tail()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        try:
            self.tmp_path.unlink()
        except OSError:
            pass

    def keep_partial(self) -> None:
        """Close without deleting the temporary file (resume after an interruption)."""
        self._stop_tail()
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            try:
                os.close(self._fd)
            except OSError:
                pass  # called on the way out of a failure: that failure is the one to report
            self._fd = -1

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._fd >= 0:
            self.abort()


def _reserve(fd: int, size: int, path: Path) -> None:
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # filesystems without fallocate (some network/overlay mounts) fall through
    os.ftruncate(fd, size)


def _disk_error(exc: OSError, path: Path, size: int) -> MergeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputPathError(
            f"{path}: not enough disk space (the output needs {size / 2**30:.2f} GiB in {path.parent}); "
            "free space or choose another folder — no file was written"
        )
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OutputPathError(f"{path}: cannot write in {path.parent} ({exc.strerror}); choose a writable folder")
    return OutputPathError(f"{path}: write failed ({exc.strerror or exc})")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
