"""Only what pyproject.toml cannot say: the WebUI loads the board's script and style sheet from the
repository root (``javascript/``, ``style.css``), where no package can reach them, so a wheel build
copies them into ``lib_merge/webui/board/static/`` for the standalone board (see lib_merge/webui/board/assets.py)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSETS = ("javascript/merge_board.js", "style.css")


class BuildWithAssets(build_py):
    def run(self):
        super().run()
        static = Path(self.build_lib) / "lib_merge" / "webui" / "board" / "static"
        static.mkdir(parents=True, exist_ok=True)
        for asset in ASSETS:
            shutil.copyfile(ROOT / asset, static / Path(asset).name)


setup(cmdclass={"build_py": BuildWithAssets})
