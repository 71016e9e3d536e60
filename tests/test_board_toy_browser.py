"""The standalone board over toy models in headless Chromium: with Live preview on, the preview
image appears, and moving α, the seed or a guidance knob changes the image's bytes.

The page is served by gradio 4 (this interpreter) and, where tools/dev made it, by gradio 3.41
(.venv-gradio3, A1111's version), each in its own server process; Playwright drives both from here
(the gradio 3 environment has no Playwright). Helpers and Chromium flags are the board browser
test's (tests/test_board_browser.py)."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from tests.test_board_browser import CHROMIUM, WAIT_MS, _pick, _wait_input, board_page, page_errors, serving_board  # noqa: E402
from tests.test_board_toy import write_toy_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRADIO3 = Path(os.environ.get("MERGEBOARD_GRADIO3_PYTHON") or REPO / ".venv-gradio3" / "bin" / "python")
SERVERS = [pytest.param(sys.executable, id="gradio4"),
           pytest.param(str(GRADIO3), id="gradio3",
                        marks=pytest.mark.skipif(not GRADIO3.exists(), reason="no .venv-gradio3 (tools/dev test makes it)"))]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (tools/dev installs it)")


@pytest.fixture(scope="module", params=SERVERS)
def toy_board(request, tmp_path_factory):
    folder = write_toy_folder(tmp_path_factory.mktemp("toy_board"))
    with serving_board(request.param, folder) as served:
        yield served


# The preview's bytes as the browser gets them (gradio 4: a served file; gradio 3: a data URL).
READ_IMAGE = """async () => {
    const img = document.querySelector('#mergeboard_image img');
    if (!img || !img.src) return null;
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    return {src: img.src, bytes: Array.from(bytes)};
}"""


def _image(page, old_src=None) -> tuple[str, str]:
    """(src, sha256 of the bytes) of the preview once it shows an image other than ``old_src``."""
    page.wait_for_function("(old) => { const i = document.querySelector('#mergeboard_image img');"
                           " return i && i.src && i.src !== old && i.complete && i.naturalWidth > 0; }",
                           arg=old_src, timeout=WAIT_MS * 2)
    got = page.evaluate(READ_IMAGE)
    return got["src"], hashlib.sha256(bytes(got["bytes"])).hexdigest()


def _commit(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.scroll_into_view_if_needed()
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_live_preview_image_follows_the_controls(toy_board):
    url, log_path = toy_board
    with board_page(url, "#mergeboard_live input[type=checkbox]") as (page, console):
        _pick(page, "mergeboard_model_A", "toy-round.safetensors")
        page.wait_for_selector("#mergeboard_arch [data-model='toy-round.safetensors']", timeout=WAIT_MS)
        _pick(page, "mergeboard_model_B", "toy-square.safetensors")
        _commit(page, "mergeboard_steps", "4")  # a short render; live is still off: nothing drawn yet

        page.locator("#mergeboard_live input[type=checkbox]").check()
        src0, first = _image(page)
        shots = {first}

        _commit(page, "mergeboard_alpha", "0.9")  # α: the merge changes, so the picture does
        src1, after_alpha = _image(page, src0)
        assert after_alpha not in shots
        shots.add(after_alpha)

        _commit(page, "mergeboard_pseed", "5")  # another seed
        src2, after_seed = _image(page, src1)
        assert after_seed not in shots
        shots.add(after_seed)

        _commit(page, "mergeboard_opt_pag", "3")  # a guidance knob
        _, after_pag = _image(page, src2)
        assert after_pag not in shots
        _wait_input(page, "mergeboard_model_A", "toy-round.safetensors")
        info = page.locator("#mergeboard_infotext textarea").first.input_value()
        assert "Seed: 5-8" in info and "PAG scale: 3" in info and "Merge recipe" in info, info
        status = page.locator("#mergeboard_status").first.inner_text()
        assert "error" not in status.lower(), status
    errors = page_errors(console)
    assert not errors, errors
    assert "Traceback" not in log_path.read_text()
