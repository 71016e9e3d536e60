"""Lazy checkpoint readers: the header is parsed and validated up front, tensor data is mapped
one key at a time, so memory holds only the tensors in flight.

Each tensor gets its own small file mapping (private, so a stray write can never reach the file),
unmapped as soon as the tensor is freed. Compared with reading into fresh tensors this skips a
copy and the page faults of zero-filled anonymous memory (measured: 0.4 s instead of 1.4 s for
the 1.9 GB of large SD1.5 tensors); compared with mapping the whole file it keeps the resident
set at the tensors in flight instead of the size of every input. Like safetensors' own
``safe_open``, this relies on inputs not being truncated during the merge.
"""
from __future__ import annotations

import json
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import CorruptFileError
from .dtypes import CODE_TO_TORCH, TORCH_TO_CODE, itemsize

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "F16"
    offset: int  # absolute byte offset in the file (-1 when not file-backed)
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return CODE_TO_TORCH[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader:
    """Common interface: ``infos`` (key → TensorInfo, in file order), ``metadata``, ``get(key)``."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        return list(self.infos)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self.infos.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.path.name


_READAHEAD_MIN = 1 << 20


def _itemsize(info: "TensorInfo") -> int:
    return torch.empty((), dtype=info.torch_dtype).element_size()


class SafetensorsReader(CheckpointReader):
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptFileError(f"{self.path}: file not found; check the path or the models folder") from None
        except IsADirectoryError:
            raise CorruptFileError(f"{self.path}: is a folder, not a checkpoint file") from None
        except OSError as exc:
            raise CorruptFileError(f"{self.path}: cannot open ({exc.strerror}); check its permissions") from None
        self._lock = threading.Lock()
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptFileError(f"{self.path}: is not a regular file; give the path of a checkpoint")
            self.file_size = st.st_size
            self.infos, self.metadata, self.data_start = _parse_header(self._fd, self.file_size, self.path)
        except BaseException:
            # close() also forgets the fd: a bare os.close here let __del__ close the same number
            # again later, by then possibly another reader's file
            self.close()
            raise

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        lead = info.offset - start
        if lead % _itemsize(info):
            # a misaligned tensor cannot be viewed in place; read a copy instead
            out = torch.empty(info.shape, dtype=info.torch_dtype)
            self.read_into(info, out)
            return out
        window = mmap.mmap(self._fd, lead + info.nbytes, offset=start, access=mmap.ACCESS_COPY)
        if info.nbytes >= _READAHEAD_MIN:
            window.madvise(mmap.MADV_WILLNEED, 0, lead + info.nbytes)
        raw = torch.frombuffer(window, dtype=torch.uint8, count=info.nbytes, offset=lead)
        return raw.view(info.torch_dtype).view(info.shape)

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, matching dtype/shape) with the tensor's bytes."""
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < info.nbytes:
            n = os.preadv(self._fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise CorruptFileError(
                    f"{self.path}: file shrank while reading {info.key!r}; was it overwritten during the merge?"
                )
            done += n

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # a reader dropped without close() must not leak its descriptor
        try:
            self.close()
        except Exception:
            pass


def _parse_header(fd: int, file_size: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate everything the data reads will rely on, so a bad file fails before any merge work."""
    if file_size < 8:
        raise CorruptFileError(
            f"{path}: truncated ({file_size} bytes, no safetensors header); re-download or re-save the file"
        )
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n < 2 or n > _MAX_HEADER or 8 + n > file_size:
        raise CorruptFileError(
            f"{path}: bad safetensors header length {n} for a {file_size}-byte file; "
            "the file is truncated or not a safetensors file"
        )
    raw = os.pread(fd, n, 8)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise CorruptFileError(f"{path}: __metadata__ is not an object; the file is corrupt")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_meta.items()}
    data_start = 8 + n
    data_size = file_size - data_start
    infos: list[TensorInfo] = []
    for key, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: header entry for {key!r} is malformed; the file is corrupt") from None
        if code not in CODE_TO_TORCH:
            raise CorruptFileError(
                f"{path}: tensor {key!r} has unsupported dtype {code!r}; the file is corrupt or uses a "
                "format this torch build cannot read — re-save it as fp16/bf16/fp32 safetensors"
            )
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CorruptFileError(f"{path}: tensor {key!r} has an invalid shape or offsets; the file is corrupt")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * itemsize(code):
            raise CorruptFileError(
                f"{path}: tensor {key!r} spans {end - begin} bytes but shape {list(shape)} {code} needs "
                f"{numel * itemsize(code)}; the file is corrupt"
            )
        if end > data_size:
            raise CorruptFileError(
                f"{path}: truncated — tensor {key!r} ends at byte {data_start + end} but the file has "
                f"{file_size}; re-download or re-save it"
            )
        infos.append(TensorInfo(key, shape, code, data_start + begin, end - begin))
    infos.sort(key=lambda i: (i.offset, i.nbytes))  # an empty tensor may share the next one's offset
    for prev, cur in zip(infos, infos[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise CorruptFileError(f"{path}: tensors {prev.key!r} and {cur.key!r} overlap; the file is corrupt")
    return {i.key: i for i in infos}, metadata, data_start


class TensorDictReader(CheckpointReader):
    """A reader over tensors already materialised (pickled checkpoints, tests)."""

    def __init__(self, path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata=None):
        self.path = Path(path)
        self._tensors = dict(tensors)
        self.metadata = dict(metadata or {})
        self.infos = {
            k: TensorInfo(k, tuple(t.shape), TORCH_TO_CODE[t.dtype], -1, t.numel() * t.element_size())
            for k, t in self._tensors.items()
        }

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        # mmap-backed tensors from torch.load are read lazily here; contiguous() copies only when needed
        return t.contiguous()


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint lazily by its suffix: safetensors natively, pickles only through the
    restricted unpickler (no code from the file ever runs)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise CorruptFileError(f"{p}: is a directory, not a checkpoint file; name a .safetensors (or .ckpt) file in it")
    if suffix in PICKLE_SUFFIXES:
        from .safe_pickle import load_pickled_state_dict

        tensors = load_pickled_state_dict(p)
        return TensorDictReader(p, tensors)
    if not p.exists():
        raise CorruptFileError(f"{p}: file not found; check the path or the models folder")
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CorruptFileError(
            f"{p}: unknown checkpoint type {suffix!r}; use .safetensors (or .ckpt/.pt through the safe loader)"
        )
    return SafetensorsReader(p)


def iter_in_file_order(reader: CheckpointReader) -> Iterator[TensorInfo]:
    return iter(sorted(reader.infos.values(), key=lambda i: (i.offset, i.key)))
