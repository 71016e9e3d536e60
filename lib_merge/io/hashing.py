"""A1111-compatible model hashes: sha256 of the whole file (its first 10 hex digits are the
"short hash" shown in the UI and infotext) and the legacy 8-digit hash of 64 KiB at 1 MiB.

Hashing a 6 GB file costs seconds, so results are cached by (path, size, mtime) in a small JSON
file, the way the WebUI caches its own hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_BLOCK = 8 * 1024 * 1024
_cache_lock = threading.Lock()


def cache_file() -> Path:
    base = os.environ.get("LIB_MERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lib_merge"
    )
    return Path(base) / "hashes.json"


def sha256_file(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    p = Path(path).resolve()
    st = p.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}"
    cache = _load_cache() if use_cache else {}
    hit = cache.get(str(p))
    if hit and hit.get("ident") == ident:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    value = digest.hexdigest()
    if use_cache:
        _store(str(p), ident, value)
    return value


def remember_sha256(path: str | os.PathLike[str], sha256: str) -> None:
    """Cache a digest computed elsewhere (the writer hashes its output while writing it), so the
    WebUI or a later merge that reads this file as an input does not hash it again."""
    p = Path(path).resolve()
    st = p.stat()
    _store(str(p), f"{st.st_size}:{st.st_mtime_ns}", sha256)


def short_hash(sha256: str) -> str:
    return sha256[:10]


def legacy_hash(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _load_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(path: str, ident: str, value: str) -> None:
    with _cache_lock:
        data = _load_cache()
        data[path] = {"ident": ident, "sha256": value}
        target = cache_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, target)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
