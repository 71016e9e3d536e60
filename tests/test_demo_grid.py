"""The demo's picture (lib_merge/toy/demo_grid.py, ``demo_pictures`` in lib_merge/demo.py): two toy
checkpoints in the family's 16×16 layout, merged with the real engine, drawn into one PNG grid.

The models are seeded random initialisations, not trained ones: what is checked is the pipeline
and the arithmetic the grid shows (the α = 0 merge draws exactly what A draws, α = 1 what B
draws, the stack changes the untitled row), which does not depend on training and costs seconds."""
from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from lib_merge import demo
from lib_merge.toy import demo_grid
from lib_merge.toy.family import PLANS
from lib_merge.toy.model import build_toy_model, save_toy_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
PROMPTS = demo_grid.PROMPTS[:2]
ROWS = 2 + len(demo_grid.ALPHAS) + len(demo_grid.PRESETS) + 2


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory) -> Path:
    """A folder laid out like lib_merge/toy/pretrained/: toy-round and toy-square, fp16."""
    folder = tmp_path_factory.mktemp("pretrained")
    config = PLANS["quick"].model_config()
    for seed, name in enumerate(demo_grid.PRETRAINED):
        save_toy_checkpoint(build_toy_model(seed, config), folder / name, dtype=torch.float16)
    return folder


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    # the whole image data decompresses to one filter byte + 3 bytes a pixel per row
    idat = data.index(b"IDAT")
    (size,) = struct.unpack(">I", data[idat - 4:idat])
    assert len(zlib.decompress(data[idat + 4:idat + 4 + size])) == height * (1 + 3 * width)
    return width, height


def test_grid_rows_are_the_models_and_merges(toy_pair, tmp_path):
    a, b = demo_grid.pretrained_models(toy_pair)
    result = demo_grid.make_demo_grid(a, b, tmp_path / "out", prompts=PROMPTS, steps=STEPS)
    assert result.path == tmp_path / "out" / "toy_grid.png" and result.path.is_file()
    assert len(result.rows) == len(result.labels) == ROWS
    for row in result.rows:
        assert row.dtype == torch.uint8 and tuple(row.shape) == (len(PROMPTS), 3, 16, 16)
    # geometry of png.grid at the demo's scale: cells of 16·6 px plus a 2 px gutter
    cell = 16 * 6 + 2
    assert _png_size(result.path) == (len(PROMPTS) * cell + 2, ROWS * cell + 2)

    rows = dict(zip(result.labels, result.rows))
    assert torch.equal(rows["α=0"], rows["A (toy-round)"])  # fp32 merge at α = 0 is A, bit for bit
    assert torch.equal(rows["α=1"], rows["B (toy-square)"])
    assert not torch.equal(rows["A (toy-round)"], rows["B (toy-square)"])
    assert not torch.equal(rows["α=0.5"], rows["A (toy-round)"])
    assert not torch.equal(rows["GRAD_V"], rows["SMOOTHSTEP"])
    untitled = [r for label, r in rows.items() if label.startswith("untitled")]
    assert len(untitled) == 2 and not torch.equal(*untitled)
    for label in ("α=0.25", "GRAD_V", "SMOOTHSTEP"):
        assert label in result.legend
    # every merge went through the engine into a file
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == sorted(n for _, n, _ in demo_grid._merge_jobs(a, b))


def test_demo_pictures_copies_and_prints_the_grid(toy_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_grid, "PRETRAINED_DIR", toy_pair)
    monkeypatch.setattr(demo_grid, "make_demo_grid",
                        functools.partial(demo_grid.make_demo_grid, prompts=PROMPTS, steps=STEPS))
    demo.demo_pictures(tmp_path)
    out = capsys.readouterr().out
    grid = tmp_path / "merged" / "toy" / "toy_grid.png"
    assert f"pictures: {grid.resolve()}" in out and grid.is_file()
    assert "rows: A (toy-round) | B (toy-square) | α=0 |" in out
    for name in demo_grid.PRETRAINED:  # copied into the demo folder, so the board finds them there
        assert (tmp_path / name).read_bytes() == (toy_pair / name).read_bytes()


def test_demo_pictures_skipped_in_one_line_without_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_grid, "PRETRAINED_DIR", tmp_path / "none")
    demo.demo_pictures(tmp_path / "demo")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("pictures: skipped")
    assert not (tmp_path / "demo" / "merged").exists()


def test_copy_replaces_a_truncated_copy(toy_pair, tmp_path):
    (tmp_path / "toy-round.safetensors").write_bytes(b"half")
    copied = demo_grid.copy_pretrained(tmp_path, toy_pair)
    assert [p.name for p in copied] == list(demo_grid.PRETRAINED)
    assert copied[0].read_bytes() == (toy_pair / "toy-round.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_wheel_ships_the_pretrained_folder(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "repo"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "demo_models", "build", "*.egg-info",
                                                             "__pycache__", "tests", "toy_*", "*.safetensors"))
    pre = src / "lib_merge" / "toy" / "pretrained"
    shutil.rmtree(pre, ignore_errors=True)
    pre.mkdir()
    (pre / "toy-round.safetensors").write_bytes(b"stand-in")
    (pre / "README.md").write_text("stand-in\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sd_webui_mergeboard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lib_merge/toy/pretrained/toy-round.safetensors" in names
    assert "lib_merge/toy/pretrained/README.md" in names
