"""Where the board's browser script and style sheet are: at the repository root in a checkout, an
editable install or a WebUI extension folder (the WebUI itself serves them from there), or in
``static/`` beside this module in an installed wheel (setup.py copies them)."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def read_asset(relative: str) -> str:
    """``relative`` as laid out at the repository root (``javascript/merge_board.js``, ``style.css``);
    an empty string when neither place has it (the board still works: the server keeps the sliders
    and the weight string in sync, the script only makes it instant)."""
    for candidate in (_HERE.parents[2] / relative, _HERE / "static" / Path(relative).name):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return ""
