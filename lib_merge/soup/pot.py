"""Incremental soups (Diffusion Soup, arXiv 2406.08431): a pot holds Σ wᵢθᵢ per key in fp64
plus the ingredient list, so adding, removing or reweighting one model reads only that model
(and the pot), never the other ingredients; ``export`` writes the weighted average.

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

Why fp64: with fp16/bf16/fp32 ingredients every wᵢθᵢ is exact or rounded at 2⁻⁵³, so any
sequence of adds and removes leaves the sum within ~1e-15 (relative) of the direct sum, far below
fp16's 2⁻¹¹ — the export equals the direct weighted average within fp16 rounding. The price: a
pot is 8 bytes per parameter (4× an fp16 model), and each change reads and rewrites it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..arch import detect_architecture, key_kind
from ..errors import ArchitectureMismatchError, CorruptPotError, MergeError, NonFiniteError, OutputPathError, SoupError
from ..io.dtypes import CODE_TO_TORCH, output_dtype
from ..io.hashing import sha256_file
from ..io.reader import CheckpointReader, SafetensorsReader, open_checkpoint
from ..io.writer import SafetensorsWriter, _fsync_dir
from ..engine import all_finite

FORMAT = "lib_merge-soup"
VERSION = 1
MANIFEST = "manifest.json"
FIXED = "fixed.safetensors"
CHUNK = 1 << 18


@dataclass
class Ingredient:
    name: str
    path: str
    sha256: str
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "weight": self.weight}


def _crc_manifest(data: dict[str, Any]) -> int:
    body = {k: v for k, v in data.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _tensor_crc(t: torch.Tensor, crc: int = 0) -> int:
    if not t.numel():
        return crc
    return zlib.crc32(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()), crc)


class Pot:
    """One soup folder. Methods that change it are atomic (see the module doc)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.data = self._load()

    # -- manifest ------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.exists():
            raise SoupError(f"{self.folder}: not a soup pot (no {MANIFEST}); create one with `soup init {self.folder}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CorruptPotError(f"{path}: unreadable manifest ({exc}); the pot is corrupted") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptPotError(f"{path}: not a lib_merge soup manifest")
        if data.get("version") != VERSION:
            raise SoupError(f"{path}: pot version {data.get('version')!r}; this lib_merge reads version {VERSION}")
        if data.get("manifest_crc32") != _crc_manifest(data):
            raise CorruptPotError(f"{path}: manifest checksum mismatch — it was edited or damaged; the pot cannot be trusted")
        return data

    def _commit(self, data: dict[str, Any]) -> None:
        data["manifest_crc32"] = _crc_manifest(data)
        tmp = self.folder / (MANIFEST + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / MANIFEST)
        except OSError as exc:
            with contextlib.suppress(OSError):  # best effort; the first error is the one to report
                tmp.unlink()
            raise _pot_write_error(self.folder, exc) from None
        _fsync_dir(self.folder)
        self.data = data

    @property
    def ingredients(self) -> list[Ingredient]:
        return [Ingredient(**i) for i in self.data["ingredients"]]

    @property
    def total_weight(self) -> float:
        return math.fsum(i.weight for i in self.ingredients)

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...], str, str]] | None:
        raw = self.data.get("layout")
        return None if raw is None else [(k, tuple(shape), code, kind) for k, shape, code, kind in raw]

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def init(cls, folder: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> "Pot":
        root = Path(folder)
        if (root / MANIFEST).exists():
            raise SoupError(f"{root}: already a soup pot; use `soup show {root}`")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _pot_write_error(root, exc) from None
        data: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "arch": None, "inpainting": None, "layout": None,
            "base": None, "ingredients": [], "generation": 0, "sums": None, "checksums": {},
            "fixed": None, "fixed_checksums": {},
        }
        pot = cls.__new__(cls)
        pot.folder = root
        pot.data = data
        if base is not None:
            with open_checkpoint(base) as reader:
                pot._adopt_layout(reader, data)
                data["base"] = {"name": Path(base).stem, "path": str(Path(base).resolve()), "sha256": sha256_file(base)}
        pot._commit(data)
        return pot

    def _adopt_layout(self, reader: CheckpointReader, data: dict[str, Any]) -> None:
        """Fix the pot's architecture and key layout from ``reader`` and store its copied keys."""
        info = detect_architecture(reader.shapes(), reader.metadata, source=str(reader.path))
        layout = []
        for key, item in sorted(reader.infos.items(), key=lambda kv: kv[1].offset):
            kind = key_kind(key, item.dtype, item.shape)
            if kind != "drop":
                layout.append([key, list(item.shape), item.dtype, "sum" if kind == "merge" else "copy"])
        fixed = [(k, tuple(s), CODE_TO_TORCH[c]) for k, s, c, kind in layout if kind == "copy"]
        checksums = {}
        if fixed:
            writer = SafetensorsWriter(self.folder / FIXED, fixed, {"format": FORMAT + "-fixed"}, overwrite=True)
            try:
                for key, _, _ in fixed:
                    t = reader.get(key)
                    if not all_finite(t):  # copied into every export unchanged: refuse it here
                        raise NonFiniteError(
                            f"{key}: NaN/Inf in {reader.path.name}, which the pot would copy into every export; "
                            "that checkpoint is damaged — the pot was not changed"
                        )
                    checksums[key] = _tensor_crc(t)
                    writer.write(key, t.contiguous())
                writer.finish()
            except BaseException:
                writer.abort()
                raise
        data.update(arch=info.arch.name, inpainting=info.inpainting, layout=layout,
                    fixed=FIXED if fixed else None, fixed_checksums=checksums)

    # -- changes -------------------------------------------------------------------------------
    def add(self, models: Sequence[str | os.PathLike[str]], weight: float = 1.0, *, threads: int | None = None) -> list[Ingredient]:
        if not (weight > 0 and math.isfinite(weight)):
            raise SoupError(f"soup add: weight {weight!r} must be a positive number")
        if not models:
            raise SoupError("soup add: name at least one model")
        members = {i.sha256: i for i in self.ingredients}
        added = []
        for model in models:
            digest = sha256_file(model)
            if digest in members or any(a.sha256 == digest for a in added):
                raise SoupError(f"{model}: already in the pot (sha256 {digest[:10]}); use `soup reweight` to change its weight")
            added.append(Ingredient(Path(model).stem, str(Path(model).resolve()), digest, float(weight)))
        data = json.loads(json.dumps(self.data))
        data["ingredients"] = data["ingredients"] + [a.to_dict() for a in added]
        self._update(data, [(Path(a.path), a.weight) for a in added], threads)
        return added

    def remove(self, models: Sequence[str | os.PathLike[str]], *, threads: int | None = None) -> list[Ingredient]:
        gone = [self._member(m) for m in models]
        hashes = {g.sha256 for g in gone}
        data = json.loads(json.dumps(self.data))
        data["ingredients"] = [i for i in data["ingredients"] if i["sha256"] not in hashes]
        if not data["ingredients"]:
            self._update(data, [], threads, empty=True)
        else:
            self._update(data, [(Path(m), -g.weight) for m, g in zip(models, gone)], threads)
        return gone

    def reweight(self, model: str | os.PathLike[str], weight: float, *, threads: int | None = None) -> Ingredient:
        if not (weight > 0 and math.isfinite(weight)):
            raise SoupError(f"soup reweight: weight {weight!r} must be a positive number (use `soup remove` to take it out)")
        member = self._member(model)
        data = json.loads(json.dumps(self.data))
        for item in data["ingredients"]:
            if item["sha256"] == member.sha256:
                item["weight"] = float(weight)
        self._update(data, [(Path(model), float(weight) - member.weight)], threads)
        return member

    def _member(self, model: str | os.PathLike[str]) -> Ingredient:
        if not Path(model).exists():
            raise SoupError(f"{model}: file not found; removing or reweighting needs the ingredient itself (it is subtracted)")
        digest = sha256_file(model)
        for item in self.ingredients:
            if item.sha256 == digest:
                return item
        names = ", ".join(f"{i.name} [{i.sha256[:10]}]" for i in self.ingredients) or "none"
        raise SoupError(f"{model} [{digest[:10]}] is not in the pot {self.folder}; its ingredients: {names}")

    def _update(self, data: dict[str, Any], terms: list[tuple[Path, float]], threads: int | None, *, empty: bool = False) -> None:
        """new sums = old sums + Σ coef·θ for (path, coef) in ``terms``; commit ``data``."""
        with _locked(self.folder):
            on_disk = self._load()
            if on_disk.get("generation") != self.data.get("generation"):
                raise SoupError(f"{self.folder}: the pot was changed by another command meanwhile; run this one again")
            self._apply(data, terms, threads, empty)

    def _apply(self, data: dict[str, Any], terms: list[tuple[Path, float]], threads: int | None, empty: bool) -> None:
        readers: list[CheckpointReader] = []
        old = None
        new_name = f"sums-{data['generation'] + 1:06d}.safetensors"
        writer = None
        try:
            for path, _ in terms:
                readers.append(open_checkpoint(path))
            if data.get("layout") is None:
                if not readers:
                    raise SoupError("soup: nothing to add")
                self._adopt_layout(readers[0], data)
            for reader in readers:
                self._check_compatible(reader, data)
            if self.data.get("sums"):
                old = self._open_sums()
            data["generation"] += 1
            if empty:
                data["sums"], data["checksums"] = None, {}
            else:
                summed = [(k, tuple(s)) for k, s, _, kind in data["layout"] if kind == "sum"]
                writer = SafetensorsWriter(self.folder / new_name, [(k, s, torch.float64) for k, s in summed],
                                           {"format": FORMAT + "-sums", "generation": str(data["generation"])}, overwrite=True)
                coefs = [c for _, c in terms]
                checksums = _parallel(
                    [k for k, _ in summed], lambda key: _update_key(key, old, readers, coefs, writer), threads
                )
                old_checks = self.data.get("checksums", {})
                if old is not None:
                    for key, (old_crc, _) in checksums.items():
                        if old_crc != old_checks.get(key):
                            raise CorruptPotError(
                                f"{self.folder}: sums of {key!r} fail their checksum — the pot is corrupted; nothing was changed"
                            )
                writer.finish()
                writer = None
                data["sums"] = new_name
                data["checksums"] = {k: new for k, (_, new) in checksums.items()}
        except BaseException:
            if writer is not None:
                writer.abort()
            for r in readers:
                r.close()
            if old is not None:
                old.close()
            raise
        for r in readers:
            r.close()
        if old is not None:
            old.close()
        previous = self.data.get("sums")
        self._commit(data)
        # Committed: leftovers that cannot be removed now are swept by the next change.
        with contextlib.suppress(OSError):
            if previous and previous != data["sums"]:
                (self.folder / previous).unlink(missing_ok=True)
            self._sweep()

    def _check_compatible(self, reader: CheckpointReader, data: dict[str, Any]) -> None:
        info = detect_architecture(reader.shapes(), reader.metadata, source=str(reader.path))
        if info.arch.name != data["arch"] or info.inpainting != data["inpainting"]:
            kind = lambda arch, inp: f"{arch}{' inpainting' if inp else ''}"  # noqa: E731
            raise ArchitectureMismatchError(
                f"{reader.path.name} is {kind(info.arch.name, info.inpainting)} but the pot {self.folder.name} holds "
                f"{kind(data['arch'], data['inpainting'])} models; use a pot per architecture"
            )
        problems = []
        for key, shape, _, _ in data["layout"]:
            item = reader.infos.get(key)
            if item is None:
                problems.append(f"lacks {key}")
            elif tuple(item.shape) != tuple(shape):
                problems.append(f"{key} is {list(item.shape)}, the pot has {list(shape)}")
        keys = {k for k, *_ in data["layout"]}
        extra = [k for k, i in reader.infos.items() if k not in keys and key_kind(k, i.dtype, i.shape) != "drop"]
        if extra:
            problems.append(f"has {len(extra)} key(s) the pot lacks (e.g. {extra[0]})")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ArchitectureMismatchError(
                f"{reader.path.name} does not match the pot's layout: {'; '.join(problems[:3])}{more}"
            )

    def _open_sums(self) -> SafetensorsReader:
        path = self.folder / self.data["sums"]
        if not path.exists():
            raise CorruptPotError(f"{path}: the pot's sums file is missing; the pot is corrupted")
        try:
            reader = SafetensorsReader(path)
        except MergeError as exc:
            raise CorruptPotError(f"{path}: {exc}") from None
        expected = {k for k, _, _, kind in self.layout or [] if kind == "sum"}
        if set(reader.infos) != expected or any(i.dtype != "F64" for i in reader.infos.values()):
            reader.close()
            raise CorruptPotError(f"{path}: keys or dtypes differ from the manifest; the pot is corrupted")
        return reader

    def _sweep(self) -> None:
        """Remove leftovers of interrupted changes: unreferenced sums files and temp files."""
        keep = {self.data.get("sums"), self.data.get("fixed"), MANIFEST}
        for p in self.folder.iterdir():
            if p.name.endswith(".tmp") or (p.name.startswith("sums-") and p.name not in keep):
                p.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def verify(self, threads: int | None = None) -> None:
        """Check every stored byte against the manifest's checksums."""
        if self.data.get("sums"):
            with self._open_sums() as sums:
                crcs = _parallel(list(sums.infos), lambda key: _tensor_crc(sums.get(key)), threads)
            for key, crc in crcs.items():
                if crc != self.data["checksums"].get(key):
                    raise CorruptPotError(f"{self.folder}: sums of {key!r} fail their checksum; the pot is corrupted")
        self._fixed_tensors()

    def _fixed_tensors(self) -> dict[str, torch.Tensor]:
        if not self.data.get("fixed"):
            return {}
        try:
            reader = SafetensorsReader(self.folder / self.data["fixed"])
        except MergeError as exc:
            raise CorruptPotError(f"{self.folder / self.data['fixed']}: {exc}") from None
        with reader:
            out = {k: reader.get(k).clone() for k in reader.infos}
        for key, t in out.items():
            if _tensor_crc(t) != self.data["fixed_checksums"].get(key):
                raise CorruptPotError(f"{self.folder}: fixed key {key!r} fails its checksum; the pot is corrupted")
        return out

    def describe(self) -> str:
        data = self.data
        lines = [f"soup pot {self.folder}"]
        arch = data.get("arch") or "(set by the first model)"
        lines.append(f"  architecture: {arch}{' inpainting' if data.get('inpainting') else ''}, "
                     f"{len(data.get('layout') or [])} keys, generation {data['generation']}")
        base = data.get("base")
        lines.append(f"  base: {base['name']} [{base['sha256'][:10]}] {base['path']}" if base else "  base: none")
        total = self.total_weight
        lines.append(f"  ingredients: {len(data['ingredients'])}, total weight {total:g}")
        for item in self.ingredients:
            share = item.weight / total if total else 0.0
            lines.append(f"    {item.name:<32} weight {item.weight:<8g} share {share:6.1%}  [{item.sha256[:10]}]  sha256 {item.sha256}")
        if data.get("sums"):
            size = (self.folder / data["sums"]).stat().st_size
            lines.append(f"  sums: {data['sums']} ({size / 2**30:.2f} GiB, float64)")
        return "\n".join(lines)

    def export(
        self, output: str | os.PathLike[str], *, dtype: str = "fp16", scale: float = 1.0, overwrite: bool = False,
        threads: int | None = None, hash_output: bool = True,
    ) -> tuple[Path, str | None]:
        """Write Σ wᵢθᵢ / Σ wᵢ as a checkpoint; with ``scale`` ≠ 1 (pots with a base only),
        base + scale·(average − base). Reads the pot only (and the base when scale ≠ 1)."""
        from ..metadata import build_soup_metadata

        ingredients = self.ingredients
        if not ingredients:
            raise SoupError(f"{self.folder}: the pot is empty; add models first")
        base = self.data.get("base")
        if scale != 1.0 and not base:
            raise SoupError("soup export --scale needs a pot made with --base (it scales the soup's offset from the base)")
        out_dtype = output_dtype(dtype)
        out_path = Path(output)
        total = self.total_weight
        fixed = self._fixed_tensors()
        layout = self.layout or []
        planned = [(k, s, CODE_TO_TORCH[c] if kind == "copy" else out_dtype) for k, s, c, kind in layout]
        metadata = build_soup_metadata(self, out_path, dtype, scale)
        sums = self._open_sums()
        base_reader = open_checkpoint(base["path"]) if scale != 1.0 else None
        writer = SafetensorsWriter(out_path, planned, metadata, inputs=[sums.path], overwrite=overwrite)
        try:
            def one(key: str) -> int:
                if key in fixed:
                    writer.write(key, fixed[key])
                    return 0
                src = sums.get(key)
                crc = _tensor_crc(src)
                if crc != self.data["checksums"].get(key):
                    raise CorruptPotError(f"{self.folder}: sums of {key!r} fail their checksum; nothing was exported")
                flat = src.reshape(-1)
                b = base_reader.get(key).reshape(-1) if base_reader is not None else None
                buf = torch.empty(min(CHUNK, flat.numel()), dtype=out_dtype)
                for start in range(0, flat.numel(), CHUNK):
                    stop = min(flat.numel(), start + CHUNK)
                    mean = flat[start:stop] / total
                    if b is not None:
                        part = b[start:stop].to(torch.float64)
                        mean = part + scale * (mean - part)
                    chunk = buf[: stop - start]
                    chunk.copy_(mean)
                    if not all_finite(chunk):
                        if b is not None and not all_finite(b[start:stop]):
                            raise NonFiniteError(f"{key}: NaN/Inf in the base {Path(base['path']).name}; "
                                                 "that checkpoint is damaged — export without --scale")
                        raise NonFiniteError(f"{key}: the soup average overflows {dtype}; export with --dtype fp32 or bf16")
                    writer.write_part(key, start, chunk)
                writer.complete(key)
                return crc

            _parallel([k for k, *_ in layout], one, threads)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            sums.close()
            if base_reader is not None:
                base_reader.close()
        digest = sha256_file(out_path) if hash_output else None
        return out_path, digest


def _pot_write_error(folder: Path, exc: OSError) -> MergeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "not enough disk space; free space"
    elif exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        reason = f"cannot write there ({exc.strerror}); keep the pot in a writable folder"
    else:
        reason = f"write failed ({exc.strerror or exc})"
    return OutputPathError(f"{folder}: {reason} — the pot was not changed")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One change at a time per pot (an advisory lock; where fcntl is missing, e.g. on Windows,
    keeping to one writer is up to the user)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _pot_write_error(folder, exc) from None
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


def _update_key(key: str, old: SafetensorsReader | None, readers: list[CheckpointReader], coefs: list[float],
                writer: SafetensorsWriter) -> tuple[int | None, int]:
    """One key: stream old + Σ coef·θ into the new sums file; returns (CRC of the old bytes, CRC of the new)."""
    src = old.get(key).reshape(-1) if old is not None else None
    old_crc = _tensor_crc(src) if src is not None else None
    models = [r.get(key).reshape(-1) for r in readers]
    n = models[0].numel() if models else src.numel()  # type: ignore[union-attr]
    buf = torch.empty(min(CHUNK, n), dtype=torch.float64)
    crc = 0
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        acc = buf[: stop - start]
        if src is not None:
            acc.copy_(src[start:stop])
        else:
            acc.zero_()
        for model, coef, reader in zip(models, coefs, readers):
            part = model[start:stop]
            if not all_finite(part):
                raise NonFiniteError(f"{reader.path.name}: NaN/Inf in {key}; that checkpoint is damaged — the pot was not changed")
            acc.add_(part.to(torch.float64), alpha=coef)
        crc = _tensor_crc(acc, crc)
        writer.write_part(key, start, acc)
    writer.complete(key)
    return old_crc, crc


@contextlib.contextmanager
def _restore_torch_threads(count: int):
    try:
        yield
    finally:
        torch.set_num_threads(count)  # after the pool's threads set 1 (see engine.single_threaded_torch)


def _parallel(keys: Iterable[str], fn: Callable[[str], Any], threads: int | None) -> dict[str, Any]:
    """Run ``fn`` per key on a small pool (single-threaded torch per worker, as the engine)."""
    from ..engine import default_threads, single_threaded_torch

    keys = list(keys)
    torch_threads = torch.get_num_threads()
    with _restore_torch_threads(torch_threads), ThreadPoolExecutor(
            max_workers=threads or default_threads(), thread_name_prefix="lib_merge_soup",
            initializer=single_threaded_torch) as pool:
        futures = {key: pool.submit(fn, key) for key in keys}
        results = {}
        try:
            for key in keys:
                results[key] = futures[key].result()
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
    return results
