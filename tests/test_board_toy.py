"""The standalone board over a folder of toy models (lib_merge/webui/board/host_toy.py): the preview
draws model A live-merged through the session, exactly what sampling the saved merge draws, and
puts A back. Runs under gradio 4 (.venv) and 3.41 (.venv-gradio3; tools/dev runs it there too).

The toy models are seeded random initialisations in the family's 16×16 layout: the checks are
about which weights the sampler sees, which training does not change."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio")

from lib_merge.demo import ensure_demo_models  # noqa: E402
from lib_merge.engine import merge  # noqa: E402
from lib_merge.recipe import Recipe  # noqa: E402
from lib_merge.toy.family import PLANS  # noqa: E402
from lib_merge.toy.model import build_toy_model, load_toy_checkpoint, save_toy_checkpoint  # noqa: E402
from lib_merge.toy.png import grid  # noqa: E402
from lib_merge.toy.sampling import sample  # noqa: E402
from lib_merge.torch_threads import on_one_torch_thread  # noqa: E402
from lib_merge.webui.board import host_toy  # noqa: E402
from lib_merge.webui.board.standalone import StandaloneHost, make_host  # noqa: E402
from lib_merge.webui.board.ui import build  # noqa: E402

STEPS = 3
PROMPT = "large red circle, centre, plain background, vivid borderless flat"


def write_toy_folder(folder: Path) -> Path:
    """toy-round / toy-square (fp16, like the shipped ones) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = PLANS["quick"].model_config()
    for seed, name in enumerate(("toy-round.safetensors", "toy-square.safetensors")):
        save_toy_checkpoint(build_toy_model(seed + 10, config), folder / name, dtype=torch.float16)
    return folder


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_folder(tmp_path_factory.mktemp("toys"))


@pytest.fixture
def board(toy_dir):
    host = make_host(toy_dir)
    assert isinstance(host, host_toy.ToyHost)
    return build(host, standalone=True)[1]


def _values(board, alpha=0.5, weights="", a="toy-round.safetensors", b="toy-square.safetensors"):
    values = [a, b, None, None, None, None, "weighted_sum", alpha, 0.5, weights, 0]
    return values + [board.param_specs[n].default for n in board.param_names]


def _preview(board, alpha=0.5, seed=7, prompt=PROMPT, **kw):
    return board.on_preview(prompt, "", seed, STEPS, 512, 512, 5.0, *_values(board, alpha), sampler="Euler", **kw)


def _expected(model, seed=7, prompt=PROMPT, **kw) -> np.ndarray:
    # on the host's one torch thread: a different thread count may round a pixel the other way
    images = on_one_torch_thread(sample, model, [prompt] * host_toy.IMAGES, seed=seed, steps=STEPS, cfg_scale=5.0, **kw)
    return grid([images], scale=host_toy.SCALE, gutter=4).permute(1, 2, 0).numpy()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_folder_decides_the_host(toy_dir, tmp_path):
    demo = tmp_path / "demo"
    ensure_demo_models(demo)
    plain = make_host(demo)
    assert type(plain) is StandaloneHost and not plain.has_sampler
    assert host_toy.is_toy_file(toy_dir / "toy-round.safetensors")
    assert not host_toy.is_toy_file(demo / "sd15_base.safetensors")  # real SD1 layout, 4-channel conv_in
    # a merge of toy files has the engine's metadata, not the toy config: still recognised
    merged = merge(Recipe("weighted_sum", (str(toy_dir / "toy-round.safetensors"), str(toy_dir / "toy-square.safetensors")),
                          alpha=0.3), tmp_path / "m.safetensors").path
    assert host_toy.is_toy_file(merged)
    ui, board = build(make_host(toy_dir), standalone=True)
    ids = {c.get("props", {}).get("elem_id"): c for c in ui.get_config_file()["components"]}
    assert {"mergeboard_sampler", "mergeboard_opt_cfgpp", "mergeboard_opt_pag", "mergeboard_opt_seg"} <= set(ids)


def test_preview_draws_the_saved_merge_and_restores_a(board, toy_dir, tmp_path):
    a_file = toy_dir / "toy-round.safetensors"
    a = load_toy_checkpoint(a_file)
    image, info, status = _preview(board, alpha=0.3)
    assert "error" not in status, status
    merged = load_toy_checkpoint(merge(Recipe("weighted_sum", (str(a_file), str(toy_dir / "toy-square.safetensors")),
                                              alpha=0.3), tmp_path / "m.safetensors").path)
    merged.config = a.config  # the merge's file lost the 16×16 config (see host_toy._resolution)
    shown = np.asarray(image)
    assert shown.shape == (16 * host_toy.SCALE + 8, host_toy.IMAGES * (16 * host_toy.SCALE + 4) + 4, 3)
    # the live merge holds what the saved file (the board's default fp16) holds: the same picture
    assert np.array_equal(shown, _expected(merged))
    assert not np.array_equal(shown, _expected(a))
    assert "Seed: 7-10" in info and "Size: 16x16" in info and "Merge recipe" in info and "0.3" in info
    # live preview off: the loaded model is A again, bit for bit
    loaded = board.host._model
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_guidance_knobs_and_untitled_reach_the_sampler(board, toy_dir):
    a = load_toy_checkpoint(toy_dir / "toy-round.safetensors")
    from lib_merge.toy.sampling import toy_guidance

    knobs = dict(cfgpp=0.6, pag=3.0, seg=3.0)
    image, info, _ = _preview(board, alpha=0.0, prompt="", options=knobs)
    expected = _expected(a, prompt="", untitled="empty",
                         settings=toy_guidance(cfgpp=0.6, pag_scale=3.0, seg_scale=3.0))
    assert np.array_equal(np.asarray(image), expected)
    assert "untitled" in info and "CFG++ λ: 0.6" in info and "PAG scale: 3" in info
    plain, _, _ = _preview(board, alpha=0.0, prompt="")
    assert not np.array_equal(np.asarray(plain), expected)


def test_live_on_keeps_the_patch_and_switching_off_restores(board, toy_dir):
    a = load_toy_checkpoint(toy_dir / "toy-round.safetensors")
    board.on_live(True, *_values(board, alpha=0.8))
    first, _, _ = board.on_live_image(True, PROMPT, "", 7, STEPS, 512, 512, 5.0, *_values(board, alpha=0.8), sampler="Euler")
    loaded = board.host._model
    assert not torch.equal(loaded.unet.out[2].weight, a.unet.out[2].weight)  # still patched between renders
    second, _, _ = board.on_live_image(True, PROMPT, "", 7, STEPS, 512, 512, 5.0, *_values(board, alpha=0.2), sampler="Euler")
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    off = board.on_live_image(False, PROMPT, "", 7, STEPS, 512, 512, 5.0, *_values(board, alpha=0.2))
    assert all(isinstance(o, dict) and "value" not in o for o in off)  # live off: the image is left alone
    board.on_live(False, *_values(board, alpha=0.2))
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_non_toy_model_a_is_one_sentence(board, toy_dir, tmp_path):
    # a real-layout SD1 file beside the toys: listed, but the preview says why it cannot draw it
    demo = tmp_path / "demo"
    ensure_demo_models(demo)
    target = toy_dir / "sd15_base.safetensors"
    target.hardlink_to(demo / "sd15_base.safetensors")
    try:
        image, _, status = board.on_preview(PROMPT, "", 1, STEPS, 512, 512, 5.0,
                                            *_values(board, a="sd15_base.safetensors", b="sd15_base.safetensors"))
    finally:
        target.unlink()
    assert image is None and "not a toy model" in status and "Traceback" not in status


def test_queued_live_renders_draw_only_the_newest(board):
    """Events that arrive while a render runs wait for it; when it ends only the newest draws."""
    import threading

    results: dict[float, tuple] = {}

    def render(alpha):
        results[alpha] = board.on_live_image(True, PROMPT, "", 7, STEPS, 512, 512, 5.0, *_values(board, alpha),
                                             sampler="Euler")

    threads = []
    with board._render_lock:  # a render in progress
        for n, alpha in enumerate((0.1, 0.4, 0.7), start=1):
            threads.append(threading.Thread(target=render, args=(alpha,)))
            threads[-1].start()
            while board._render_turn < n:  # each has taken its turn before the next arrives
                threading.Event().wait(0.01)
    for t in threads:
        t.join(60)
    for alpha in (0.1, 0.4):
        assert all(isinstance(o, dict) and "value" not in o for o in results[alpha])  # skipped: image left alone
    image, info, _ = results[0.7]
    assert np.asarray(image).ndim == 3 and '"alpha":0.7' in info


def test_a_merged_toy_file_as_a_draws_at_the_family_size(board, toy_dir):
    """A board-saved merge has the engine's metadata, not the toy config: its size comes from B."""
    merged = toy_dir / "saved_merge.safetensors"
    merge(Recipe("weighted_sum", (str(toy_dir / "toy-round.safetensors"), str(toy_dir / "toy-square.safetensors")),
                 alpha=0.5), merged)
    try:
        board.checkpoints(refresh=True)
        image, info, status = board.on_preview(PROMPT, "", 1, STEPS, 512, 512, 5.0,
                                               *_values(board, a="saved_merge.safetensors"), sampler="Euler")
    finally:
        merged.unlink()
        board.checkpoints(refresh=True)
    assert image is not None, status
    assert np.asarray(image).shape[0] == 16 * host_toy.SCALE + 8 and "Size: 16x16" in info
