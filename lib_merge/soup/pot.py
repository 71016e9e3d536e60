"""``Pot``: one soup folder and the changes to it. Each change checks its request, builds the
next manifest, and under the pot's lock rewrites the sums (``sums``) and commits (``store``);
anything that fails before the commit leaves the pot as it was."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..engine.pool import map_keys
from ..errors import CorruptPotError, SoupError
from ..io.hashing import sha256_file
from ..io.reader import CheckpointReader, open_checkpoint
from .export import export_pot
from .store import (
    FORMAT, MANIFEST, VERSION, Ingredient, fixed_tensors, locked, open_sums, pot_write_error, read_manifest, sweep,
    tensor_crc, write_manifest,
)
from .sums import adopt_layout, check_compatible, write_sums


class Pot:
    """One soup folder. Methods that change it are atomic (see ``store``)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.data = read_manifest(self.folder)

    def _commit(self, data: dict[str, Any]) -> None:
        write_manifest(self.folder, data)
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
            raise pot_write_error(root, exc) from None
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
                adopt_layout(root, reader, data)
                data["base"] = {"name": Path(base).stem, "path": str(Path(base).resolve()), "sha256": sha256_file(base)}
        pot._commit(data)
        return pot

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
        with locked(self.folder):
            on_disk = read_manifest(self.folder)
            if on_disk.get("generation") != self.data.get("generation"):
                raise SoupError(f"{self.folder}: the pot was changed by another command meanwhile; run this one again")
            self._apply(data, terms, threads, empty)

    def _apply(self, data: dict[str, Any], terms: list[tuple[Path, float]], threads: int | None, empty: bool) -> None:
        readers: list[CheckpointReader] = []
        old = None
        try:
            for path, _ in terms:
                readers.append(open_checkpoint(path))
            if data.get("layout") is None:
                if not readers:
                    raise SoupError("soup: nothing to add")
                adopt_layout(self.folder, readers[0], data)
            for reader in readers:
                check_compatible(self.folder, reader, data)
            if self.data.get("sums"):
                old = open_sums(self.folder, self.data)
            data["generation"] += 1
            if empty:
                data["sums"], data["checksums"] = None, {}
            else:
                write_sums(self.folder, data, old, self.data.get("checksums", {}), readers, [c for _, c in terms], threads)
        finally:
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
            sweep(self.folder, self.data)

    # -- reading -------------------------------------------------------------------------------
    def verify(self, threads: int | None = None) -> None:
        """Check every stored byte against the manifest's checksums."""
        if self.data.get("sums"):
            with open_sums(self.folder, self.data) as sums:
                crcs = map_keys(list(sums.infos), lambda key: tensor_crc(sums.get(key)), threads, "lib_merge_soup")
            for key, crc in crcs.items():
                if crc != self.data["checksums"].get(key):
                    raise CorruptPotError(f"{self.folder}: sums of {key!r} fail their checksum; the pot is corrupted")
        fixed_tensors(self.folder, self.data)

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
        threads: int | None = None, hash_output: bool = True, executor=None,
    ) -> tuple[Path, str | None]:
        """Write Σ wᵢθᵢ / Σ wᵢ as a checkpoint; with ``scale`` ≠ 1 (pots with a base only),
        base + scale·(average − base). Reads the pot only (and the base when scale ≠ 1).
        ``executor``: see ``export_pot``."""
        return export_pot(self, output, dtype=dtype, scale=scale, overwrite=overwrite, threads=threads,
                          hash_output=hash_output, executor=executor)
