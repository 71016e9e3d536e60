"""A's originals: what the loaded model held before the live merge first wrote a key, kept so that
``restore`` puts model A back bit-exactly, and the mapped files they are compared with.

An original is captured the first time its key is patched (from the LoRA backup when a LoRA is
applied; ``LiveTarget.original``). It is not copied when it is A's file tensor cast to the
model's dtype (an upcast model), nor, beyond the cache limit, when it equals the file: both are
checked once, at capture, and such keys are re-read from the file on restore. Nothing is placed
on the model's device. Input files are mapped once per session (``MappedReader``); the planner
reads A through ``ModelAReader``, which serves A's bytes from RAM where they equal the file.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..errors import MergeError
from ..io.reader import CheckpointReader, SafetensorsReader, open_checkpoint
from .produce import LIVE_CHUNK, scratch
from .target import LiveTarget

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included), compared as integers of the
    element's width, which torch compares several times faster than bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))


class Originals:
    """A's original values by checkpoint key (``kept``; None: re-read from A's file), the RAM they
    take (``cached_bytes``, bounded by ``cache_limit_bytes`` where they equal the file) and the
    session's mapped input files. The caller serialises everything but ``capture``, which runs on
    several threads at once (one key each)."""

    def __init__(self, target: LiveTarget, model_a: Path, cache_limit_bytes: int | None):
        self.target = target
        self.model_a = model_a
        self.cache_limit_bytes = cache_limit_bytes
        self.kept: dict[str, torch.Tensor | None] = {}  # None: re-read from A's file
        self.same_as_file: set[str] = set()  # originals bit-identical to A's file
        self.cached_bytes = 0
        self._capture_lock = threading.Lock()
        self._readers: dict[str, CheckpointReader] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.kept

    # -- files ------------------------------------------------------------------------------------
    def reader(self, path: str) -> CheckpointReader:
        key = str(Path(path).resolve())
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = MappedReader.open(path)
        return reader

    def close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    # -- capture and restore ----------------------------------------------------------------------
    def capture(self, key: str) -> None:
        """Keep A's value of ``key`` for ``restore``. Not kept when it is A's file tensor cast to the
        model's dtype (hosts that upcast, e.g. ``--no-half``): restore re-reads the file and the
        write casts it the same way, so the same bits come back without a RAM copy. Values
        bit-identical to the file are kept while they fit the cache limit (merges then read A's
        bytes from RAM); anything else is always kept."""
        if key in self.kept:
            return
        live = self.target.original(key).detach()
        # Compared where it lies and copied only if kept: Forge's weights are inference tensors,
        # and copying each before finding it equal to the file cost a third of Forge's first patch.
        borrowed = live.device.type == "cpu"
        value = live if borrowed else live.to("cpu", copy=True)
        match = self.file_match(key, value)
        if match == "cast":
            self.kept[key] = None
            return
        nbytes = value.numel() * value.element_size()
        limit = self.cache_limit_bytes
        with self._capture_lock:
            over = limit is not None and self.cached_bytes + nbytes > limit
            if not over or match != "same":
                self.cached_bytes += nbytes
        if over and match == "same":
            self.kept[key] = None
            return
        # clone() outside inference mode also turns an inference tensor into a normal one
        self.kept[key] = value.clone() if borrowed or value.is_inference() else value
        if match == "same":
            self.same_as_file.add(key)  # merges may read A's bytes from RAM instead of the file

    def file_match(self, key: str, value: torch.Tensor) -> str | None:
        """"same" when A's file holds exactly these bytes, "cast" when A's file tensor cast to
        ``value``'s dtype gives exactly these bits, else None."""
        try:
            reader = self.reader(str(self.model_a))
        except MergeError:
            return None
        info = reader.infos.get(key)
        if info is None or info.shape != tuple(value.shape):
            return None
        stored = reader.get(key)
        if stored.dtype == value.dtype:
            return "same" if same_bits(stored, value) else None
        if not (stored.is_floating_point() and value.is_floating_point()):
            return None
        # Cast a chunk at a time into a reused buffer: a whole-tensor cast would allocate (and
        # page-fault) as much fresh memory as the model holds, once per session.
        flat_stored, flat_value = stored.reshape(-1), value.reshape(-1)
        buffer = scratch.get(value.dtype, min(LIVE_CHUNK, flat_value.numel()))
        for start in range(0, flat_value.numel(), LIVE_CHUNK):
            stop = min(start + LIVE_CHUNK, flat_value.numel())
            cast = buffer[: stop - start]
            cast.copy_(flat_stored[start:stop])
            if not same_bits(cast, flat_value[start:stop]):
                return None
        return "cast"

    def value(self, key: str) -> torch.Tensor:
        value = self.kept[key]
        if value is None:
            value = self.reader(str(self.model_a)).get(key)  # every write path copies it
        return value

    def clear(self) -> None:
        """Forget every original (the host reloaded the weights); the mapped files stay."""
        self.kept.clear()
        self.same_as_file.clear()
        self.cached_bytes = 0


class MappedReader(CheckpointReader):
    """A safetensors file mapped once for the whole live session (read-only, private): tensors
    are views into the mapping, so moving a slider again reads B's block from already-mapped pages
    instead of mapping and faulting them in anew. Pickled checkpoints fall back to the core reader."""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointReader:
        reader = open_checkpoint(path)
        if not isinstance(reader, SafetensorsReader) or reader.file_size == 0:
            return reader
        return cls(reader)

    def __init__(self, reader: "SafetensorsReader"):
        import mmap

        self._inner = reader
        self.path, self.infos, self.metadata = reader.path, reader.infos, reader.metadata
        with open(reader.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._raw = torch.frombuffer(self._map, dtype=torch.uint8)

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        size = torch.empty((), dtype=info.torch_dtype).element_size()
        if info.offset % size:
            return self._inner.get(key)
        return self._raw[info.offset: info.offset + info.nbytes].view(info.torch_dtype).view(info.shape)

    def close(self) -> None:
        self._raw = None
        try:
            self._map.close()
        except (BufferError, ValueError):  # a tensor view is still alive: the GC unmaps it later
            pass
        self._inner.close()


class ModelAReader(CheckpointReader):
    """Model A for the planner and the engine: its file's header, and for every key whose
    original was captured bit-identical to the file, the RAM copy instead of the file's bytes."""

    def __init__(self, reader: CheckpointReader, originals: Originals):
        self._reader, self._originals = reader, originals
        self.path, self.infos, self.metadata = reader.path, reader.infos, reader.metadata

    def get(self, key: str) -> torch.Tensor:
        if key in self._originals.same_as_file:
            value = self._originals.kept.get(key)
            if value is not None:
                return value
        return self._reader.get(key)
