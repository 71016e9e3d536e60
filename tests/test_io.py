"""Checkpoint I/O: the streaming writer (round trip, streaming, failure paths, refusal to overwrite
inputs), the lazy reader's validation of damaged files, and the restricted unpickler."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lib_merge.errors import CorruptFileError, MergeError, OutputPathError, UnsafePickleError
from lib_merge.io import SafetensorsReader, SafetensorsWriter, open_checkpoint
from lib_merge.io.hashing import legacy_hash, sha256_file, short_hash
from lib_merge.io.reader import TensorDictReader
from lib_merge.io.safe_pickle import load_pickled_state_dict


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "half": torch.randn(3, 7, generator=g).to(torch.float16),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "fp32": torch.randn(2, 3, 4, generator=g),
        "int64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "bool": torch.tensor([True, False, True, True, False]),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(3.25, dtype=torch.float32),
        "odd": torch.randn(3, generator=g).to(torch.float16),  # 6 bytes: later tensors start misaligned
        "after_odd": torch.randn(9, generator=g),
    }


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_all(path: Path, tensors: dict[str, torch.Tensor], metadata=None, **kwargs) -> Path:
    planned = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    with SafetensorsWriter(path, planned, metadata, **kwargs) as w:
        for k, t in tensors.items():
            w.write(k, t)
        return w.finish()


# ---- writer: round trip --------------------------------------------------------------------------


def test_writer_round_trip_bytes_metadata_and_alignment(tmp_path):
    tensors = sample_tensors()
    meta = {"lib_merge_recipe": json.dumps({"version": 1}), "note": "ünïcode ✓", "empty": ""}
    path = write_all(tmp_path / "rt.safetensors", tensors, meta)
    assert path == tmp_path / "rt.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.safetensors"]

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and (8 + n) % 8 == 0
    header = json.loads(raw[8: 8 + n])
    assert header["__metadata__"] == meta
    assert len(raw) == 8 + n + sum(t.numel() * t.element_size() for t in tensors.values())

    with SafetensorsReader(path) as r:
        assert r.metadata == meta
        assert list(r.infos) == list(tensors)  # file order = planned order
        for k, t in tensors.items():
            got = r.get(k)
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), k
            assert raw_bytes(got) == raw_bytes(t), k
            info = r.infos[k]
            assert raw[info.offset: info.offset + info.nbytes] == raw_bytes(t), k


def test_written_file_is_readable_by_the_reference_library(tmp_path):
    from safetensors import safe_open

    tensors = sample_tensors()
    path = write_all(tmp_path / "ref.safetensors", tensors, {"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and raw_bytes(got) == raw_bytes(t), k


def test_reader_reads_reference_library_files(tmp_path):
    from safetensors.torch import save_file

    tensors = sample_tensors()
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, str(path), metadata={"a": "b"})
    with SafetensorsReader(path) as r:
        assert r.metadata == {"a": "b"}
        for k, t in tensors.items():
            assert raw_bytes(r.get(k)) == raw_bytes(t), k


def test_reader_accepts_empty_tensor_listed_after_a_tensor_at_the_same_offset(tmp_path):
    # Valid per the format (safetensors' own safe_open loads it): an empty tensor may share its
    # offset with the next tensor, and writers do not all list the header in data order.
    from safetensors import safe_open

    header = {
        "w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "v_pred": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
    }
    data = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    path = craft(tmp_path / "order.safetensors", header, raw_bytes(data))
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("v_pred").numel() == 0
    with SafetensorsReader(path) as r:
        assert torch.equal(r.get("w"), data)
        assert r.get("v_pred").shape == (0,)


def test_reader_tensors_are_copy_on_write(tmp_path):
    t = torch.arange(4096, dtype=torch.float32)
    path = write_all(tmp_path / "cow.safetensors", {"t": t})
    before = path.read_bytes()
    with SafetensorsReader(path) as r:
        got = r.get("t")
        got.add_(1)  # a stray in-place op must never reach the file
    assert path.read_bytes() == before


# ---- writer: streaming ---------------------------------------------------------------------------


def test_write_part_in_random_order_from_several_threads(tmp_path):
    g = torch.Generator().manual_seed(11)
    tensors = {f"t{i}": torch.randn(1000 + 37 * i, generator=g).to(torch.float16) for i in range(12)}
    tensors["b"] = torch.randn(7, 13, generator=g).to(torch.bfloat16)
    planned = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    path = tmp_path / "stream.safetensors"
    writer = SafetensorsWriter(path, planned)
    pieces = []
    for k, v in tensors.items():
        flat = v.reshape(-1)
        cuts = sorted({0, flat.numel(), *random.Random(k).sample(range(1, flat.numel()), 5)})
        pieces += [(k, lo, flat[lo:hi].clone()) for lo, hi in zip(cuts, cuts[1:])]
    random.Random(3).shuffle(pieces)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: writer.write_part(*p), pieces))
    assert sorted(writer.missing) == sorted(tensors)  # nothing is complete until declared
    for k in reversed(list(tensors)):
        writer.complete(k)
    assert writer.missing == []
    writer.finish()
    with SafetensorsReader(path) as r:
        for k, v in tensors.items():
            assert raw_bytes(r.get(k)) == raw_bytes(v), k


def test_write_part_rejects_wrong_dtype_overrun_and_unplanned_keys(tmp_path):
    path = tmp_path / "bad.safetensors"
    with SafetensorsWriter(path, [("a", (4,), torch.float16)]) as w:
        with pytest.raises(MergeError, match="planned torch.float16"):
            w.write_part("a", 0, torch.zeros(4))
        with pytest.raises(MergeError, match="past the end"):
            w.write_part("a", 2, torch.zeros(3, dtype=torch.float16))
        with pytest.raises(MergeError, match="not planned"):
            w.write_part("b", 0, torch.zeros(1, dtype=torch.float16))
        with pytest.raises(MergeError, match="planned"):
            w.write("a", torch.zeros(2, 2, dtype=torch.float16))
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_duplicate_planned_key_is_refused(tmp_path):
    with pytest.raises(MergeError, match="planned twice"):
        SafetensorsWriter(tmp_path / "dup.safetensors", [("a", (1,), torch.float32), ("a", (1,), torch.float32)])
    assert list(tmp_path.iterdir()) == []


# ---- writer: write-back and the output hash while writing ----------------------------------------


def _streamed(tmp_path, seed=21, n=9):
    """Keys of a few MiB (the hasher reads 8 MiB blocks), written out of order from threads."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"k{i}": torch.randn(300_000 + 77_777 * i, generator=g).to(torch.float16) for i in range(n)}
    tensors["empty"] = torch.empty(0, dtype=torch.float32)
    tensors["last"] = torch.arange(5.0)
    return tensors, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def _write_shuffled(writer, tensors, keys=None):
    keys = list(keys if keys is not None else tensors)
    random.Random(len(keys)).shuffle(keys)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda k: writer.write(k, tensors[k]), keys))


def test_output_sha256_is_computed_while_writing_out_of_order(tmp_path):
    tensors, planned = _streamed(tmp_path)
    path = tmp_path / "h.safetensors"
    writer = SafetensorsWriter(path, planned, {"m": "x"}, hash_output=True)
    _write_shuffled(writer, tensors)
    writer.finish()
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_file(str(path)).keys() == tensors.keys()


def test_output_sha256_of_a_resumed_file_covers_the_bytes_of_the_first_run(tmp_path):
    tensors, planned = _streamed(tmp_path, seed=4)
    path = tmp_path / "r.safetensors"
    first = SafetensorsWriter(path, planned, hash_output=True)
    kept = [k for k in tensors if k.endswith(("1", "2", "5"))]
    _write_shuffled(first, tensors, kept)
    first.keep_partial()
    second = SafetensorsWriter(path, planned, hash_output=True, resume=True)
    assert second.resumed
    second.mark_written(kept)
    _write_shuffled(second, tensors, [k for k in tensors if k not in kept])
    second.finish()
    whole = path.read_bytes()
    assert second.sha256 == hashlib.sha256(whole).hexdigest()
    reference = write_all(tmp_path / "ref.safetensors", tensors)
    assert whole == reference.read_bytes()


def test_every_written_byte_is_handed_to_write_back_before_the_rename(tmp_path, monkeypatch):
    """Durable writes start write-back of each finished key while the merge runs, so the final
    fsync finds little left: by the rename, every byte of the file was handed over."""
    from lib_merge.io import writeback

    started: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(fd, offset, nbytes, flags):
        assert flags == writeback.SYNC_FILE_RANGE_WRITE
        with lock:
            started.append((offset, offset + nbytes))

    monkeypatch.setattr(writeback, "sync_file_range", record)
    tensors, planned = _streamed(tmp_path, seed=8)
    path = tmp_path / "wb.safetensors"
    writer = SafetensorsWriter(path, planned)
    seen_at_rename = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen_at_rename.extend(started), real_replace(a, b)))
    _write_shuffled(writer, tensors)
    writer.finish()
    covered, end = 0, 0
    for lo, hi in sorted(seen_at_rename):
        assert lo >= end, "a range was handed over twice"
        covered, end = covered + hi - lo, hi
    assert covered == end == path.stat().st_size


@pytest.mark.parametrize("how", ["missing", "refused"])
def test_without_sync_file_range_the_output_is_the_same(tmp_path, monkeypatch, how):
    """macOS/Windows have no sync_file_range and some filesystems refuse it: the final fsync then
    does all the work, and the file and its hash are the same."""
    from lib_merge.io import writeback

    def refuse(fd, offset, nbytes, flags):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writeback, "sync_file_range", None if how == "missing" else refuse)
    tensors, planned = _streamed(tmp_path, seed=9, n=3)
    writer = SafetensorsWriter(tmp_path / "n.safetensors", planned, hash_output=True)
    _write_shuffled(writer, tensors)
    path = writer.finish()
    assert path.read_bytes() == write_all(tmp_path / "ref.safetensors", tensors).read_bytes()
    assert writer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_shorter_than_planned_fails_the_hash_and_leaves_nothing(tmp_path, monkeypatch):
    """The hasher reads every byte back: a file cut short under the writer (another process,
    a failing filesystem) fails the merge instead of yielding the hash of a partial file."""
    from lib_merge.io import writeback

    cut = threading.Event()
    real_hash_block = writeback.Tail._hash_block

    def after_the_cut(self, buf, prefix):
        cut.wait(30)
        return real_hash_block(self, buf, prefix)

    monkeypatch.setattr(writeback.Tail, "_hash_block", after_the_cut)
    tensors, planned = _streamed(tmp_path, seed=2, n=3)
    path = tmp_path / "cut.safetensors"
    writer = SafetensorsWriter(path, planned, hash_output=True)
    _write_shuffled(writer, tensors)
    os.truncate(writer.tmp_path, writer.total_size // 2)
    cut.set()
    with pytest.raises(MergeError, match=f"write failed .the file ends at {writer.total_size // 2} bytes"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []


# ---- writer: interrupted writes leave nothing ----------------------------------------------------


def test_exception_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [("a", (3,), torch.float32), ("b", (3,), torch.float32)]) as w:
            w.write("a", torch.ones(3))
            assert w.tmp_path.exists() and not path.exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(path, [("a", (3,), torch.float32)]) as w:
            w.write_part("a", 0, torch.ones(1))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_abort_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", (3,), torch.float32)])
    w.write("a", torch.ones(3))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_finish_with_missing_keys_fails_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("a", (3,), torch.float32), ("b", (2,), torch.float16)])
    w.write("a", torch.ones(3))
    w.write_part("b", 0, torch.ones(2, dtype=torch.float16))  # bytes written but never completed
    with pytest.raises(MergeError, match="1 keys were never written.*'b'"):
        w.finish()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_output(tmp_path):
    path = write_all(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("a", (3,), torch.float32)], overwrite=True) as w:
            w.write("a", torch.ones(3))
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


# ---- writer: output path rules -------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path):
    path = write_all(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    with pytest.raises(OutputPathError) as err:
        SafetensorsWriter(path, [("a", (3,), torch.float32)])
    assert str(path) in str(err.value) and "--overwrite" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    write_all(path, {"a": torch.ones(3)}, overwrite=True)
    with SafetensorsReader(path) as r:
        assert torch.equal(r.get("a"), torch.ones(3))


@pytest.mark.parametrize("how", ["same", "relative", "hardlink", "symlink"])
def test_writing_over_an_input_is_refused_even_with_overwrite(tmp_path, how, monkeypatch):
    src = write_all(tmp_path / "input.safetensors", {"a": torch.arange(3.0)})
    before = src.read_bytes()
    if how == "same":
        out = src
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("sub/../input.safetensors")
        (tmp_path / "sub").mkdir()
    elif how == "hardlink":
        out = tmp_path / "alias.safetensors"
        os.link(src, out)
    else:
        out = tmp_path / "alias.safetensors"
        out.symlink_to(src)
    with pytest.raises(OutputPathError, match="input of the merge"):
        SafetensorsWriter(out, [("a", (3,), torch.float32)], inputs=[src], overwrite=True)
    assert src.read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_missing_output_folder(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        SafetensorsWriter(tmp_path / "nope" / "x.safetensors", [("a", (1,), torch.float32)])


def _fail_with(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return fail


def test_full_disk_at_reservation(tmp_path, monkeypatch):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    monkeypatch.setattr(os, "posix_fallocate", _fail_with(errno.ENOSPC))
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputPathError) as err:
        SafetensorsWriter(path, [("a", (1000,), torch.float32)])
    message = str(err.value)
    assert "disk space" in message and str(path) in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_writing_data(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [("a", (1000,), torch.float32), ("b", (10,), torch.float32)])
    monkeypatch.setattr(os, "pwrite", _fail_with(errno.ENOSPC))
    with pytest.raises(OutputPathError, match="not enough disk space"):
        with writer:
            writer.write("a", torch.ones(1000))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_when_writing_header(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", _fail_with(errno.ENOSPC))
    with pytest.raises(OutputPathError, match="disk space"):
        SafetensorsWriter(tmp_path / "x.safetensors", [("a", (3,), torch.float32)])
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_simulated(tmp_path, monkeypatch):
    """Root ignores permission bits, so the refusal of the OS is simulated at ``os.open``."""
    real_open = os.open

    def deny_tmp(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny_tmp)
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputPathError) as err:
        SafetensorsWriter(path, [("a", (3,), torch.float32)])
    assert "choose a writable folder" in str(err.value) and str(tmp_path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _erofs(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.mark.parametrize("where", ["open", "fallocate"])
def test_read_only_filesystem_is_one_clear_error(tmp_path, monkeypatch, where):
    """On a read-only mount every call that would change it fails with EROFS — the cleanup's
    unlink of the never-made temp file included; that must not replace the first error."""
    real_open = os.open

    def ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    if where == "open":
        monkeypatch.setattr(os, "open", ro_open)
    elif hasattr(os, "posix_fallocate"):
        monkeypatch.setattr(os, "posix_fallocate", _erofs)
        monkeypatch.setattr(os, "ftruncate", _erofs)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: _erofs())
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputPathError) as err:
        SafetensorsWriter(path, [("a", (3,), torch.float32)])
    message = str(err.value)
    assert "choose a writable folder" in message and str(path) in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_failing_rename_and_close_are_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [("a", (3,), torch.float32)])
    writer.write("a", torch.ones(3))
    monkeypatch.setattr(os, "replace", _erofs)
    with pytest.raises(OutputPathError, match="writable folder"):
        writer.finish()
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    writer = SafetensorsWriter(path, [("a", (3,), torch.float32)], durable=False)
    writer.write("a", torch.ones(3))
    real_close = os.close

    def close_fails(fd):  # NFS reports a failed write-back at close
        real_close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "close", close_fails)
    with pytest.raises(OutputPathError, match="write failed"):
        writer.finish()
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _flip_dtype(tmp: Path) -> None:
    """Same length, same keys, same size: only a byte-exact header check sees it."""
    raw = bytearray(tmp.read_bytes())
    at = raw.index(b'"F32"')
    raw[at:at + 5] = b'"I32"'
    tmp.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "flip_dtype"])
def test_temp_file_damaged_before_the_rename_is_refused(tmp_path, monkeypatch, damage):
    """The temp file is read back after it is closed and before it is renamed: damage done in
    between (a failing disk, another process) must stop the merge with no file under the name."""
    path = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(path, [("a", (64,), torch.float32), ("b", (8,), torch.float32)], {"k": "v"})
    writer.write("a", torch.arange(64.0))
    writer.write("b", torch.ones(8))
    tmp, fd = writer.tmp_path, writer._fd
    real_close = os.close

    def close_then_damage(target):
        real_close(target)
        if target == fd:
            if damage == "truncate":
                os.truncate(tmp, tmp.stat().st_size - 16)
            elif damage == "garbage_header":
                with open(tmp, "r+b") as f:
                    f.seek(8)
                    f.write(b"#garbage")
            else:
                _flip_dtype(tmp)

    monkeypatch.setattr(os, "close", close_then_damage)
    with pytest.raises(CorruptFileError) as err:
        writer.finish()
    monkeypatch.undo()
    assert str(path) in str(err.value) and "no file was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="writable folder"):
            SafetensorsWriter(folder / "x.safetensors", [("a", (3,), torch.float32)])
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# ---- reader: damaged files -----------------------------------------------------------------------


def craft(path: Path, header: dict, data: bytes, *, pad: bool = True) -> Path:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.fixture
def good_file(tmp_path) -> Path:
    return write_all(
        tmp_path / "good.safetensors",
        {"a": torch.arange(16, dtype=torch.float32), "b": torch.ones(4, 4, dtype=torch.float16)},
        {"m": "x"},
    )


def assert_corrupt(path: Path, *words: str) -> str:
    with pytest.raises(CorruptFileError) as err:
        with open_checkpoint(path):
            pass
    message = str(err.value)
    assert str(path) in message, message
    rest = message.replace(str(path), "<file>")  # the words must not come from the tmp path's name
    assert any(w in rest for w in words or ("truncated", "corrupt")), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_truncated_inside_header_length(good_file, cut):
    good_file.write_bytes(good_file.read_bytes()[:cut])
    assert_corrupt(good_file, "truncated")


def test_truncated_inside_header_json(good_file):
    raw = good_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    good_file.write_bytes(raw[: 8 + n // 2])
    assert_corrupt(good_file, "truncated")


@pytest.mark.parametrize("missing", [1, 40])
def test_truncated_inside_the_data(good_file, missing):
    good_file.write_bytes(good_file.read_bytes()[:-missing])
    message = assert_corrupt(good_file, "truncated")
    assert ("'b'" if missing == 1 else "'a'") in message  # the tensor cut short is named


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_bytes(b"this is certainly not a checkpoint, just some text of a decent length")
    assert_corrupt(path)


def test_corrupt_header_json(good_file):
    raw = bytearray(good_file.read_bytes())
    raw[8:12] = b"#@!x"
    good_file.write_bytes(bytes(raw))
    assert_corrupt(good_file, "corrupt")


def test_header_not_utf8(good_file):
    raw = bytearray(good_file.read_bytes())
    raw[9] = 0xFF
    good_file.write_bytes(bytes(raw))
    assert_corrupt(good_file, "corrupt")


@pytest.mark.parametrize(
    "header,data,word",
    [
        ([1, 2], b"", "corrupt"),  # header is not an object
        ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "corrupt"),  # no offsets
        ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [80, 88]}}, b"\0" * 8, "truncated"),  # out of range
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, "corrupt"),  # end < begin
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt"),  # wrong span
        ({"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, "corrupt"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "corrupt"),  # overlap
        ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "corrupt"),  # unknown dtype
    ],
    ids=["not-object", "bad-metadata", "no-offsets", "bad-shape", "out-of-range", "negative-dim",
         "reversed-offsets", "wrong-span", "wrong-span-f16", "overlap", "unknown-dtype"],
)
def test_corrupt_headers(tmp_path, header, data, word):
    path = craft(tmp_path / "bad.safetensors", header, data)
    message = assert_corrupt(path, word)
    if isinstance(header, dict) and "__metadata__" not in header:
        for key in header:  # the damaged tensor(s) are named
            assert repr(key) in message, message


def test_huge_header_length_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}" + b"\0" * 100)
    assert_corrupt(path, "truncated")


def test_missing_file_names_the_path(tmp_path):
    for name in ("nope.safetensors", "nope.ckpt"):
        with pytest.raises(CorruptFileError) as err:
            open_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "not found" in str(err.value)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CorruptFileError, match=r"model\.gguf.*unknown checkpoint type"):
        open_checkpoint(path)


def test_failed_open_does_not_close_another_readers_file(tmp_path, good_file):
    """A reader whose header check fails must not close its descriptor twice: the second close
    (from __del__, whenever the half-built reader is collected) would hit whichever file reused
    the number — here, a healthy reader opened in between."""
    import gc

    bad = craft(tmp_path / "bad.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    held = []
    for _ in range(3):
        try:
            SafetensorsReader(bad)
        except CorruptFileError as exc:
            held.append(exc)  # its traceback keeps the half-built reader alive for now
    good = SafetensorsReader(good_file)
    try:
        held.clear()
        gc.collect()
        assert torch.equal(good.get("a"), torch.arange(16, dtype=torch.float32))
        out = torch.empty(4, 4, dtype=torch.float16)
        good.read_into(good.infos["b"], out)
        assert torch.equal(out, torch.ones(4, 4, dtype=torch.float16))
    finally:
        good.close()


def test_file_shrinking_during_a_read_is_reported(good_file):
    with SafetensorsReader(good_file) as r:
        info = r.infos["b"]
        os.truncate(good_file, info.offset + 2)
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        with pytest.raises(CorruptFileError, match="shrank"):
            r.read_into(info, out)


# ---- hashes --------------------------------------------------------------------------------------


def test_sha256_matches_hashlib_and_is_cached(tmp_path, isolated_hash_cache):
    import hashlib

    path = write_all(tmp_path / "h.safetensors", {"a": torch.arange(300_000, dtype=torch.float32)})
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == expected
    assert short_hash(expected) == expected[:10]
    cache = json.loads((isolated_hash_cache / "hashes.json").read_text())
    assert cache[str(path.resolve())]["sha256"] == expected
    # a changed file (size/mtime) is re-hashed, not served from the cache
    write_all(path, {"a": torch.zeros(300_001, dtype=torch.float32)}, overwrite=True)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest() != expected
    assert legacy_hash(path) == hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


# ---- pickles -------------------------------------------------------------------------------------


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


class _Open:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payloads(marker: Path):
    return {
        "os.system": (_System(f"touch {marker}"), "system"),
        "builtins.eval": (_Eval(f"open({str(marker)!r}, 'w').write('pwned')"), "eval"),
        "builtins.open": (_Open(str(marker)), "open"),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.open"])
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload, fmt):
    marker = tmp_path / "pwned"
    obj, global_name = _payloads(marker)[payload]
    path = tmp_path / "evil.ckpt"
    state = {"state_dict": {"model.diffusion_model.x": torch.ones(2)}, "hook": obj}
    if fmt == "torch-zip":
        torch.save(state, path)
    elif fmt == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle (plain pickle cannot hold torch storages without another global)
        path.write_bytes(pickle.dumps({"epoch": 1, "hook": obj}, protocol=2))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    assert f".{global_name}" in message and "nothing from the file was executed" in message
    assert not marker.exists(), "the pickle's payload ran"


def test_malicious_pickle_via_pt_suffix_and_load_function(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_System(f"touch {marker}"), path)
    with pytest.raises(UnsafePickleError, match="system"):
        load_pickled_state_dict(path)
    assert not marker.exists()


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).reshape(1, 77),
        "first_stage_model.decoder.conv_out.bias": torch.randn(3, generator=g),
    }


@pytest.mark.parametrize("zipfmt", [True, False])
def test_plain_state_dict_ckpt_loads(tmp_path, zipfmt):
    sd = _state_dict()
    path = tmp_path / "plain.ckpt"
    torch.save(sd, path, _use_new_zipfile_serialization=zipfmt)
    with open_checkpoint(path) as r:
        assert isinstance(r, TensorDictReader)
        assert set(r.keys()) == set(sd)
        for k, v in sd.items():
            got = r.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
            assert r.infos[k].shape == tuple(v.shape)


def test_lightning_style_checkpoint_loads(tmp_path, monkeypatch):
    """{"state_dict": …, "global_step": numpy int64, "callbacks": {ModelCheckpoint: …}} as
    pytorch_lightning writes it; the Lightning class is faked while saving and absent on load."""
    pl = types.ModuleType("pytorch_lightning")
    callbacks = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.dirpath = "/ckpt"

    ModelCheckpoint.__module__ = callbacks.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    callbacks.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setitem(sys.modules, "pytorch_lightning", pl)
    monkeypatch.setitem(sys.modules, callbacks.__name__, callbacks)
    sd = _state_dict()
    checkpoint = {
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best": np.float32(0.25)}},
        "checkpoint_callback": ModelCheckpoint(),
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    monkeypatch.delitem(sys.modules, callbacks.__name__)
    monkeypatch.delitem(sys.modules, "pytorch_lightning")
    with open_checkpoint(path) as r:
        assert set(r.keys()) == set(sd)
        for k, v in sd.items():
            assert torch.equal(r.get(k), v), k
    assert "pytorch_lightning" not in sys.modules  # nothing was imported to load it


def test_pickle_without_tensors_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {"step": 3}}, path)
    with pytest.raises(CorruptFileError, match="no tensors"):
        open_checkpoint(path)
    path2 = tmp_path / "list.ckpt"
    torch.save([torch.ones(1)], path2)
    with pytest.raises(CorruptFileError, match="no state dict"):
        open_checkpoint(path2)


@pytest.mark.parametrize("zipfmt", [True, False])
def test_truncated_ckpt_is_a_clear_error(tmp_path, zipfmt):
    path = tmp_path / "cut.ckpt"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=zipfmt)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)
