"""Shared fixtures for the merge-core tests: small synthetic SD1 / SDXL checkpoints with the real key
names (width ÷ 32, a few MB each) copied into each test's own models folder, ``models.derive`` for
damaged or altered copies, and an isolated hash cache (LIB_MERGE_CACHE) for every test. Everything
is made on the fly in temporary folders; nothing is downloaded."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pytest
import torch

from tests.files import load_tensors

# The tests' tensors are tiny: torch's intra-op threads only add contention on a 2-core machine
# (measured 3× slower wall time for the guidance tests under load), so run them single-threaded.
torch.set_num_threads(1)

# Shrink factor of the synthetic layouts: SD1 ≈ 2.3 MB, SDXL ≈ 7.3 MB in fp16.
WIDTH_DIVISOR = 32

# name -> (arch, keyword arguments of write_synthetic_checkpoint)
SYNTHETIC = {
    "sd1_a": ("sd1", dict(family=0, model=0)),
    "sd1_b": ("sd1", dict(family=0, model=1)),
    "sd1_c": ("sd1", dict(family=0, model=2)),
    "sd1_inpaint": ("sd1", dict(family=0, model=4, inpainting=True)),
    "sdxl_a": ("sdxl", dict(family=1, model=0)),
    "sdxl_b": ("sdxl", dict(family=1, model=1)),
}


@pytest.fixture(scope="session", autouse=True)
def _session_hash_cache(tmp_path_factory: pytest.TempPathFactory):
    """Session-scoped fixtures hash too: keep them out of the user's cache as well."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIB_MERGE_CACHE", str(tmp_path_factory.mktemp("session_hash_cache")))
        yield


@pytest.fixture(autouse=True)
def isolated_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test hashes into its own cache, never the user's ~/.cache/lib_merge."""
    cache = tmp_path / "lib_merge_cache"
    monkeypatch.setenv("LIB_MERGE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pristine synthetic checkpoints, built once per session; tests get copies (see ``models``)."""
    from lib_merge.synthetic import write_synthetic_checkpoint

    folder = tmp_path_factory.mktemp("synthetic_store")
    built = {}
    for name, (arch, kwargs) in SYNTHETIC.items():
        built[name] = write_synthetic_checkpoint(
            folder / f"{name}.safetensors", arch, width_divisor=WIDTH_DIVISOR, **kwargs
        )
    return built


class ModelsFolder:
    """``models.sd1_a`` is a fresh copy of that synthetic checkpoint in this test's models folder,
    made on first access (so a test only pays for the files it uses)."""

    def __init__(self, folder: Path, store: Mapping[str, Path]):
        self.dir = folder
        self._store = store

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_") or name not in self._store:
            raise AttributeError(name)
        target = self.dir / self._store[name].name
        if not target.exists():
            shutil.copyfile(self._store[name], target)
        return target

    def derive(self, src: Path, name: str, **changes) -> Path:
        """``models.dir / name``: a copy of ``src`` altered as in :func:`derive_checkpoint`."""
        return derive_checkpoint(src, self.dir / name, **changes)


@pytest.fixture
def models(tmp_path: Path, synthetic_store: dict[str, Path]) -> ModelsFolder:
    folder = tmp_path / "models"
    folder.mkdir()
    return ModelsFolder(folder, synthetic_store)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def derive_checkpoint(
    src: Path,
    dst: Path,
    *,
    drop: Iterable[str] = (),
    replace: Mapping[str, torch.Tensor] | None = None,
    add: Mapping[str, torch.Tensor] | None = None,
    edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``dst`` = ``src`` with keys dropped / replaced / added, via the reference library."""
    from safetensors.torch import save_file

    tensors = load_tensors(src)
    for key in drop:
        del tensors[key]
    for key, value in {**(replace or {}), **(add or {})}.items():
        tensors[key] = value.contiguous()
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst), metadata=dict(metadata) if metadata else None)
    return dst
