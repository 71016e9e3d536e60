"""The package builds from the repository root (which is also a WebUI extension folder with
scripts/, javascript/ and install.py beside the package) into a wheel that holds lib_merge alone,
the board's browser assets and the ``lib-merge`` console command."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("setuptools")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # build from a copy: a build writes build/ and *.egg-info next to the sources
    src = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "demo_models", "build",
                                                             "*.egg-info", "__pycache__", "tests"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return zipfile.ZipFile(built)


def test_wheel_holds_only_the_package_and_its_assets(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"lib_merge"}
    for module in ("lib_merge/cli.py", "lib_merge/io/writer.py", "lib_merge/guidance/stack.py",
                   "lib_merge/methods/registry.py", "lib_merge/webui/board/assets.py"):
        assert module in names
    for asset in ("javascript/merge_board.js", "style.css"):
        packed = "lib_merge/webui/board/static/" + Path(asset).name
        assert wheel.read(packed) == (ROOT / asset).read_bytes()


def test_wheel_declares_the_console_command(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[console_scripts]" in text and "lib-merge = lib_merge.cli:main" in text


def test_console_command_runs_from_any_folder(tmp_path):
    """tools/dev installs the checkout editable, so the venv has the command."""
    command = Path(sys.executable).parent / "lib-merge"
    if not command.exists():
        pytest.skip("lib-merge is not installed in this environment (tools/dev installs it)")
    proc = subprocess.run([str(command), "methods"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "weighted_sum" in proc.stdout
