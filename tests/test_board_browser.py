"""The standalone Merge Board driven in headless Chromium (Debian's ``chromium`` through
Playwright's Python client; never ``playwright install``): pick two demo models, choose a preset,
move a slider, watch the weight string follow, save, and find the file with its recipe. Leaves a
screenshot in docs/board.png for the README."""
from __future__ import annotations

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
SCREENSHOT = REPO / "docs" / "board.png"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed (tools/dev installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("board_models")
    ensure_demo_models(folder)
    port = _free_port()
    log = open(folder / "board.log", "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lib_merge.board_cli", "--models-dir", str(folder), "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the board exited: {(folder / 'board.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        raise RuntimeError("the board did not start within 180 s")
    yield url, folder
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _pick(page, elem_id: str, value: str) -> None:
    """Choose a dropdown option (gradio 4: role=option; gradio 3: data-testid=dropdown-option)."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} li[role=option]:text-is('{value}'), #{elem_id} [data-value='{value}']").first.click()


def _weights(page) -> str:
    return page.locator("#mergeboard_weights textarea, #mergeboard_weights input").first.input_value()


def test_pick_preset_slider_save_in_chromium(board_url):
    url, folder = board_url
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#mergeboard_w_IN04 input[type=range]", timeout=90_000)
            _pick(page, "mergeboard_model_A", "sd15_base.safetensors")
            page.wait_for_timeout(500)
            _pick(page, "mergeboard_model_B", "sd15_anime.safetensors")
            page.wait_for_timeout(500)
            _pick(page, "mergeboard_preset", "GRAD_V")
            page.wait_for_function(
                "() => { const f = document.querySelector('#mergeboard_weights textarea, #mergeboard_weights input');"
                " return f && f.value.startsWith('0,1,'); }", timeout=30_000)
            before = _weights(page).split(",")
            assert len(before) == 26

            # drag IN04 towards the right end: the string follows while dragging (JS) and after release (server)
            track = page.locator("#mergeboard_w_IN04 input[type=range]").bounding_box()
            y = track["y"] + track["height"] / 2
            page.mouse.move(track["x"] + track["width"] * float(before[5]), y)
            page.mouse.down()
            page.mouse.move(track["x"] + track["width"] * 0.95, y, steps=8)
            page.mouse.up()
            page.wait_for_function(
                "(old) => { const f = document.querySelector('#mergeboard_weights textarea, #mergeboard_weights input');"
                " return f && f.value.split(',')[5] !== old; }", arg=before[5], timeout=30_000)
            after = _weights(page).split(",")
            assert float(after[5]) > float(before[5]) + 0.1
            assert after[:5] == before[:5] and after[6:] == before[6:]
            slider_value = float(page.locator("#mergeboard_w_IN04 input[type=number]").input_value())
            assert abs(slider_value - float(after[5])) < 1e-6

            page.fill("#mergeboard_save_name textarea, #mergeboard_save_name input", "browser_merge")
            page.click("#mergeboard_save")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#mergeboard_save_result')].some(e => e.innerText.includes('saved'))",
                timeout=180_000)
            page.click("#mergeboard_compare")  # the A-vs-B heatmap, for the screenshot
            page.wait_for_selector("#mergeboard_heatmap img", timeout=120_000)
            page.wait_for_timeout(1000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    saved = folder / "browser_merge.safetensors"
    assert saved.is_file()
    recipe = load_recipe(saved)
    assert recipe.method == "weighted_sum"
    assert [Path(m).name for m in recipe.models] == ["sd15_base.safetensors", "sd15_anime.safetensors"]
    weights = recipe.weights.split(",")
    assert weights[:5] == before[:5] and abs(float(weights[5]) - float(after[5])) < 1e-6
