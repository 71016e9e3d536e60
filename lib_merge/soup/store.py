"""A pot on disk: its files, their checksums, the atomic commit and the lock.

A pot is a folder:
    manifest.json                 format, version, architecture, layout (key → shape, dtype,
                                  "sum" | "copy"), ingredients (name, path, sha256, weight),
                                  base, generation, the sums file's name and a CRC-32 per key,
                                  and a CRC-32 of the manifest itself
    sums-<generation>.safetensors Σ wᵢθᵢ of every averaged key, float64
    fixed.safetensors             keys copied, not averaged (position_ids, markers): from the
                                  base, or else from the first ingredient ever added
Every change writes a new sums file (temp name, fsync, rename), then a new manifest (temp,
fsync, rename — the commit point), then deletes the old sums file. An error at any step (wrong
architecture, not a member, a NaN, a corrupted pot, a full disk) leaves the pot as it was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CorruptPotError, MergeError, OutputPathError, SoupError
from ..io.reader import SafetensorsReader
from ..io.writer import _fsync_dir

FORMAT = "lib_merge-soup"
VERSION = 1
MANIFEST = "manifest.json"
FIXED = "fixed.safetensors"
CHUNK = 1 << 18  # elements per streamed chunk: keys go through one small buffer, never a full fp64 copy


@dataclass
class Ingredient:
    name: str
    path: str
    sha256: str
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "weight": self.weight}


def manifest_crc(data: dict[str, Any]) -> int:
    body = {k: v for k, v in data.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def tensor_crc(t: torch.Tensor, crc: int = 0) -> int:
    """CRC-32 of a tensor's bytes; ``crc`` continues a running one over chunks."""
    if not t.numel():
        return crc
    return zlib.crc32(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()), crc)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        raise SoupError(f"{folder}: not a soup pot (no {MANIFEST}); create one with `soup init {folder}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptPotError(f"{path}: unreadable manifest ({exc}); the pot is corrupted") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptPotError(f"{path}: not a lib_merge soup manifest")
    if data.get("version") != VERSION:
        raise SoupError(f"{path}: pot version {data.get('version')!r}; this lib_merge reads version {VERSION}")
    if data.get("manifest_crc32") != manifest_crc(data):
        raise CorruptPotError(f"{path}: manifest checksum mismatch — it was edited or damaged; the pot cannot be trusted")
    return data


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """The commit point of every change: the manifest replaced atomically, and durably."""
    data["manifest_crc32"] = manifest_crc(data)
    tmp = folder / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except OSError as exc:
        with contextlib.suppress(OSError):  # best effort; the first error is the one to report
            tmp.unlink()
        raise pot_write_error(folder, exc) from None
    _fsync_dir(folder)


def open_sums(folder: Path, data: dict[str, Any]) -> SafetensorsReader:
    """The sums file the manifest names, refused unless its keys and dtypes are the manifest's."""
    path = folder / data["sums"]
    if not path.exists():
        raise CorruptPotError(f"{path}: the pot's sums file is missing; the pot is corrupted")
    try:
        reader = SafetensorsReader(path)
    except MergeError as exc:
        raise CorruptPotError(f"{path}: {exc}") from None
    expected = {k for k, _, _, kind in data.get("layout") or [] if kind == "sum"}
    if set(reader.infos) != expected or any(i.dtype != "F64" for i in reader.infos.values()):
        reader.close()
        raise CorruptPotError(f"{path}: keys or dtypes differ from the manifest; the pot is corrupted")
    return reader


def fixed_tensors(folder: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The copied keys, each checked against its CRC."""
    if not data.get("fixed"):
        return {}
    try:
        reader = SafetensorsReader(folder / data["fixed"])
    except MergeError as exc:
        raise CorruptPotError(f"{folder / data['fixed']}: {exc}") from None
    with reader:
        out = {k: reader.get(k).clone() for k in reader.infos}
    for key, t in out.items():
        if tensor_crc(t) != data["fixed_checksums"].get(key):
            raise CorruptPotError(f"{folder}: fixed key {key!r} fails its checksum; the pot is corrupted")
    return out


def sweep(folder: Path, data: dict[str, Any]) -> None:
    """Remove leftovers of interrupted changes: unreferenced sums files and temp files."""
    keep = {data.get("sums"), data.get("fixed"), MANIFEST}
    for p in folder.iterdir():
        if p.name.endswith(".tmp") or (p.name.startswith("sums-") and p.name not in keep):
            p.unlink(missing_ok=True)


def pot_write_error(folder: Path, exc: OSError) -> MergeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "not enough disk space; free space"
    elif exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        reason = f"cannot write there ({exc.strerror}); keep the pot in a writable folder"
    else:
        reason = f"write failed ({exc.strerror or exc})"
    return OutputPathError(f"{folder}: {reason} — the pot was not changed")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One change at a time per pot (an advisory lock; where fcntl is missing, e.g. on Windows,
    keeping to one writer is up to the user)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise pot_write_error(folder, exc) from None
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SoupError(f"{folder}: another soup command is changing this pot; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
