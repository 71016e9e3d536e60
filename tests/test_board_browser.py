"""The standalone Merge Board driven in headless Chromium (Debian's ``chromium`` through
Playwright's Python client; never ``playwright install``): pick two demo models, choose a preset,
move a slider, type α, save, load a recipe back, and check the files and what the page shows.

Every wait is on a condition the page shows (never a fixed sleep: under load a fixed pause let a
late model-A update reset model B and the save never came). The screenshot goes to the test's
temporary folder; MERGEBOARD_SCREENSHOT=docs/board.png (a path) refreshes the README's picture."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from lib_merge.demo import ensure_demo_models  # noqa: E402
from lib_merge.recipe import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SD1_BLOCKS = 26
WAIT_MS = 60_000  # a generous bound for a condition on a loaded 2-core box; met in well under 1 s alone

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (tools/dev installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_board(python: str, folder: Path):
    """``python -m lib_merge.board_cli`` over ``folder`` on a free port: yields (url, log path) once
    the server answers, and stops it after."""
    port = _free_port()
    log_path = folder.parent / f"board-{port}.log"
    log = open(log_path, "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([python, "-m", "lib_merge.board_cli", "--models-dir", str(folder), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while time.time() < deadline:  # polls a condition: the server answers
            if proc.poll() is not None:
                raise RuntimeError(f"the board exited: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the board did not start within 180 s")
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def board_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("board_models")
    ensure_demo_models(folder)
    with serving_board(sys.executable, folder) as (url, log_path):
        yield url, folder, log_path


FIELD = "document.querySelector('#mergeboard_weights textarea, #mergeboard_weights input')"


def _pick(page, elem_id: str, value: str) -> None:
    """Choose a dropdown option (gradio 4: role=option; gradio 3: data-testid=dropdown-option) and
    wait until the dropdown shows it. On a loaded machine the open list can re-render under the
    click (Playwright: "element was detached from the DOM"); the list is then opened again."""
    option = page.locator(f"#{elem_id} li[role=option]:text-is('{value}'), #{elem_id} [data-value='{value}']").first
    for attempt in range(3):
        page.click(f"#{elem_id} input")
        try:
            option.click(timeout=WAIT_MS // 3)
            break
        except sync_api.TimeoutError:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    _wait_input(page, elem_id, value)


def _wait_input(page, elem_id: str, value: str) -> None:
    page.wait_for_function("([id, v]) => { const e = document.querySelector('#' + id + ' input');"
                           " return e && e.value === v; }", arg=[elem_id, value], timeout=WAIT_MS)


def _weights(page) -> list[str]:
    return page.locator("#mergeboard_weights textarea, #mergeboard_weights input").first.input_value().split(",")


def _wait_weights(page, condition: str, arg=None) -> None:
    """Wait until the weight string ``f`` (a list of strings) satisfies ``condition``."""
    page.wait_for_function(f"(arg) => {{ const e = {FIELD}; if (!e) return false; const f = e.value.split(',');"
                           f" return {condition}; }}", arg=arg, timeout=WAIT_MS)


def _slider(page, block: str) -> float:
    return float(page.locator(f"#mergeboard_w_{block} input[type=number]").input_value())


def _wait_slider(page, block: str, value: float) -> None:
    page.wait_for_function("([b, v]) => { const e = document.querySelector('#mergeboard_w_' + b + ' input[type=number]');"
                           " return e && Math.abs(Number(e.value) - v) < 1e-6; }", arg=[block, value], timeout=WAIT_MS)


def _wait_text(page, selector: str, text: str, timeout: int = WAIT_MS) -> None:
    page.wait_for_function("([s, t]) => [...document.querySelectorAll(s)].some(e => e.innerText.includes(t))",
                           arg=[selector, text], timeout=timeout)


def _drag(page, block: str, fraction: float) -> None:
    """Drag a block slider from its thumb to ``fraction`` of its track."""
    box = page.locator(f"#mergeboard_w_{block} input[type=range]")
    box.scroll_into_view_if_needed()  # a click further down (Save) may have scrolled it away: mouse events need it on screen
    track = box.bounding_box()
    lo, hi, now = float(box.get_attribute("min")), float(box.get_attribute("max")), _slider(page, block)
    y = track["y"] + track["height"] / 2
    page.mouse.move(track["x"] + track["width"] * (now - lo) / (hi - lo), y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * fraction, y, steps=8)
    page.mouse.up()


def _save(page, name: str) -> None:
    page.fill("#mergeboard_save_name textarea, #mergeboard_save_name input", name)
    page.click("#mergeboard_save")
    _wait_text(page, "#mergeboard_save_result", f"saved {name}.safetensors", timeout=180_000)


@contextlib.contextmanager
def board_page(url: str, ready: str):
    """A Chromium page on the board at ``url``, once ``ready`` (a selector) is on it; yields
    (page, console lines). The browser closes after."""
    console: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector(ready, timeout=90_000)
            yield page, console
        finally:
            browser.close()


def page_errors(console: list[str]) -> list[str]:
    """Errors on the page except the unreachable web font (fonts.googleapis.com is offline here).
    gradio 4.40's client also warns "Too many arguments provided for the endpoint" for every event
    with inputs (gradio-app/gradio#9895, its own api-info lookup by number): a warning, not counted."""
    return [line for line in console if line.startswith(("error", "pageerror"))
            and "ERR_NAME_NOT_RESOLVED" not in line and "fonts.googleapis.com" not in line]


def test_board_in_chromium(board_url, tmp_path):
    url, folder, log_path = board_url
    with board_page(url, "#mergeboard_w_IN04 input[type=range]") as (page, console):
        _pick(page, "mergeboard_model_A", "sd15_base.safetensors")
        # model A's handler rewrites the pickers: wait for it before picking B
        page.wait_for_selector("#mergeboard_arch [data-model='sd15_base.safetensors']", timeout=WAIT_MS)
        _pick(page, "mergeboard_model_B", "sd15_anime.safetensors")

        # a preset fills the string and the sliders; the dropdown names it
        _pick(page, "mergeboard_preset", "GRAD_V")
        _wait_weights(page, "f[0] === '0' && f[1] === '1'")
        before = _weights(page)
        assert len(before) == SD1_BLOCKS
        _wait_slider(page, "IN00", float(before[1]))

        # drag IN04: the string follows (JS while dragging, the server on release), the preset says "custom"
        _drag(page, "IN04", 0.9)
        _wait_weights(page, "f[5] !== arg", arg=before[5])
        _wait_input(page, "mergeboard_preset", "custom")
        dragged = _weights(page)
        assert float(dragged[5]) > float(before[5]) + 0.1
        assert dragged[:5] == before[:5] and dragged[6:] == before[6:]
        assert abs(_slider(page, "IN04") - float(dragged[5])) < 1e-6

        _save(page, "browser_merge")
        # the new file is offered in the pickers without pressing Refresh
        page.get_by_text("Load a recipe from a merged file").click()  # open the accordion
        page.click("#mergeboard_recipe_src input")
        page.wait_for_selector("#mergeboard_recipe_src li[role=option]:text-is('browser_merge.safetensors'), "
                               "#mergeboard_recipe_src [data-value='browser_merge.safetensors']", timeout=WAIT_MS)
        page.keyboard.press("Escape")

        # item 13: α typed and committed with Enter sets every block — sliders, string and the saved file
        alpha = page.locator("#mergeboard_alpha input[type=number]")
        alpha.fill("-0.42")
        alpha.press("Enter")
        _wait_weights(page, "f.length === 26 && f.every(v => v === '-0.42')")
        for block in ("BASE", "IN04", "M00", "OUT11"):
            _wait_slider(page, block, -0.42)
        _save(page, "typed_alpha")

        # item 17: move IN04 away, load the first merge's recipe back: string, sliders and message follow
        _drag(page, "IN04", 0.1)
        _wait_weights(page, "f[5] !== '-0.42'")
        _pick(page, "mergeboard_recipe_src", "browser_merge.safetensors")
        page.click("#mergeboard_load_recipe")
        _wait_text(page, "#mergeboard_recipe_msg", "loaded the recipe of browser_merge.safetensors")
        _wait_weights(page, "f.join(',') === arg", arg=",".join(dragged))
        _wait_slider(page, "IN04", float(dragged[5]))
        _wait_slider(page, "IN00", float(dragged[1]))

        # a bad string is reported at the field and changes nothing
        field = page.locator("#mergeboard_weights textarea, #mergeboard_weights input").first
        field.fill("IN99=1")
        field.press("Enter")
        _wait_text(page, "#mergeboard_weights_msg", "unknown block")
        assert abs(_slider(page, "IN04") - float(dragged[5])) < 1e-6

        page.click("#mergeboard_compare")  # the A-vs-B heatmap, for the screenshot
        page.wait_for_selector("#mergeboard_heatmap img", timeout=120_000)
        shot = Path(os.environ.get("MERGEBOARD_SCREENSHOT") or tmp_path / "board.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)

    recipe = load_recipe(folder / "browser_merge.safetensors")
    assert recipe.method == "weighted_sum"
    assert [Path(m).name for m in recipe.models] == ["sd15_base.safetensors", "sd15_anime.safetensors"]
    assert recipe.weights.split(",")[:5] == before[:5]
    assert abs(float(recipe.weights.split(",")[5]) - float(dragged[5])) < 1e-6
    typed = load_recipe(folder / "typed_alpha.safetensors")
    assert typed.alpha == -0.42
    assert typed.weights is None or set(typed.weights.split(",")) == {"-0.42"}

    errors = page_errors(console)
    assert not errors, errors
    log = log_path.read_text()
    assert "[Merge Board] saved" in log and "browser_merge.safetensors" in log
