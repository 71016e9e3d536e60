"""The Merge Board builds and wires its events on the installed gradio (tools/dev runs this file
under gradio 4.40 in .venv and again under gradio 3.41 in .venv-gradio3); its handlers work on
the standalone host over a folder of demo-layout checkpoints."""
from __future__ import annotations

import html
import threading

import pytest
import torch
from safetensors import safe_open

gr = pytest.importorskip("gradio")

from lib_merge.demo import ensure_demo_models  # noqa: E402
from lib_merge.recipe import load_recipe  # noqa: E402
from lib_merge.webui import board_base, board_gradio  # noqa: E402
from lib_merge.webui.board import Board, build  # noqa: E402
from lib_merge.webui.board_base import ALL_BLOCKS, NO_VAE  # noqa: E402
from lib_merge.webui.standalone import StandaloneHost  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_models(root)
    return root


@pytest.fixture
def host(folder, tmp_path):
    # a fresh folder per test with hard links to the demo models (saves do not leak between tests)
    work = tmp_path / "models"
    work.mkdir()
    for path in folder.glob("*.safetensors"):
        (work / path.name).hardlink_to(path)
    return StandaloneHost(work)


def _values(board: Board, a="sd15_base.safetensors", b="sd15_anime.safetensors", method="weighted_sum", weights="", alpha=0.5):
    values = [a, b, None, None, None, None, method, alpha, 0.5, weights, 0]
    return values + [board.param_specs[n].default for n in board.param_names]


def _dependencies(ui):
    """(trigger, elem_id) pairs of every wired event, normalised across gradio 3 and 4."""
    config = ui.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    pairs = set()
    for dep in config["dependencies"]:
        for target in dep["targets"]:
            if isinstance(target, (list, tuple)):
                pairs.add((target[1], ids.get(target[0])))
            else:
                pairs.add((dep.get("trigger"), ids.get(target)))
    return pairs, config


def test_board_builds_and_wires_every_event(host):
    ui, board = build(host, standalone=True)
    pairs, config = _dependencies(ui)
    elem_ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    for name in ALL_BLOCKS:
        assert f"mergeboard_w_{name}" in elem_ids
        assert ("release", f"mergeboard_w_{name}") in pairs
    expected = {
        ("change", "mergeboard_model_A"), ("click", "mergeboard_refresh"), ("change", "mergeboard_method"),
        ("change", "mergeboard_preset"), ("release", "mergeboard_alpha"), ("submit", "mergeboard_weights"),
        ("blur", "mergeboard_weights"), ("change", "mergeboard_weights"), ("change", "mergeboard_live"),
        ("click", "mergeboard_preview"), ("click", "mergeboard_compare"), ("click", "mergeboard_save"),
        ("click", "mergeboard_cancel"), ("click", "mergeboard_load_recipe"),
    }
    assert expected <= pairs, expected - pairs
    for name in board.param_names:  # one control per registry parameter, each feeding the recipe
        assert f"mergeboard_param_{name}" in elem_ids
        assert ("change", f"mergeboard_param_{name}") in pairs
    js_key = "js" if board_gradio.gradio_major() >= 4 else "js"
    assert any(dep.get(js_key) and "mergeboardAfterSave" in str(dep.get(js_key)) for dep in config["dependencies"])


def test_board_builds_inside_a_webui_style_blocks_context(host):
    with gr.Blocks() as outer:
        with gr.Tab("Merge Board"):
            inner, _ = build(host)
    assert inner is not None and outer is not None


def test_sliders_switch_between_26_and_20_blocks(host):
    board = Board(host)
    out = board.on_model_a("sdxl_base.safetensors", "", 0.5, "sdxl_pony.safetensors", None, None, None, None)
    picker_updates, slider_updates = out[:5], out[5:5 + len(ALL_BLOCKS)]
    assert picker_updates[0]["value"] == "sdxl_pony.safetensors"
    assert all(c.startswith("sdxl") for c in picker_updates[0]["choices"])  # filtered to A's architecture
    hidden = [name for name, u in zip(ALL_BLOCKS, slider_updates) if u.get("visible") is False]
    assert hidden == ["IN09", "IN10", "IN11", "OUT09", "OUT10", "OUT11"]
    weights = out[5 + len(ALL_BLOCKS)]["value"]
    assert len(weights.split(",")) == 20
    back = board.on_model_a("sd15_base.safetensors", weights, 0.5, None, None, None, None, None)
    assert len(back[5 + len(ALL_BLOCKS)]["value"].split(",")) == 26


def test_method_controls_come_from_the_registry(host):
    board = Board(host)
    out = board.on_method("dare")
    n = len(board_base.LETTERS) - 1
    pickers, alpha, beta, blocks, params = out[:n], out[n], out[n + 1], out[n + 2], out[n + 3:-1]
    assert all(u["visible"] for u in pickers)  # variadic: every picker
    assert alpha["visible"] and not beta["visible"] and blocks["visible"]
    shown = {name for name, u in zip(board.param_names, params) if u["visible"]}
    assert shown == {"p", "rescale", "vote", "task_weights"}
    out = board.on_method("soup")
    assert out[n + 2]["visible"] is False  # no per-block ratio: no sliders


def test_slider_and_string_stay_in_sync_server_side(host):
    board = Board(host)
    text = ",".join(["1.5"] + ["0.5"] * 25)  # BASE outside the sliders' range
    new, _ = board.on_slider("IN04", 0.25, text, "sd15_base.safetensors", 0.5)
    values = new["value"].split(",")
    assert values[0] == "1.5" and values[5] == "0.25"
    out = board.on_weights_text("GRAD_V,IN04=0.3", "sd15_base.safetensors", 0.5)
    sliders, string = out[:len(ALL_BLOCKS)], out[len(ALL_BLOCKS)]
    assert sliders[ALL_BLOCKS.index("IN04")]["value"] == 0.3
    assert string["value"].split(",")[5] == "0.3"
    bad = board.on_weights_text("IN99=1", "sd15_base.safetensors", 0.5)
    assert "unknown block" in html.unescape(bad[-1]) and all(u == gr.update() for u in bad[:len(ALL_BLOCKS)])
    preset = board.on_preset("GRAD_V", "sd15_base.safetensors")
    assert preset[len(ALL_BLOCKS)]["value"].startswith("0,1,")


def test_save_writes_the_streaming_merge_with_its_recipe(host):
    board = Board(host)
    message = html.unescape(board.on_save("board_merge", "fp16", NO_VAE, False, *_values(board, weights="GRAD_V,IN04=0.3")))
    assert "saved board_merge.safetensors" in message, message
    recipe = load_recipe(host.models_dir / "board_merge.safetensors")
    assert recipe.method == "weighted_sum"
    assert [p.split("/")[-1] for p in recipe.models] == ["sd15_base.safetensors", "sd15_anime.safetensors"]
    assert recipe.weights.split(",")[5] == "0.3"
    assert "board_merge.safetensors" in [c.title for c in host.checkpoints()]
    loaded = board.on_load_recipe("board_merge.safetensors")
    assert loaded[0]["value"] == "sd15_base.safetensors" and loaded[6]["value"] == "weighted_sum"
    assert html.unescape(board.on_save("board_merge", "fp16", NO_VAE, False, *_values(board))).count("already exists")
    assert "saved" in board.on_save("board_merge", "fp16", NO_VAE, True, *_values(board))


def test_save_refuses_an_input_and_bad_names(host):
    board = Board(host)
    assert "input of this merge" in html.unescape(board.on_save("sd15_base", "fp16", NO_VAE, True, *_values(board)))
    for name in ("../x", "x/y", "/tmp/x", "C:\\x", "con<1>"):
        assert "error" in board.on_save(name, "fp16", NO_VAE, False, *_values(board))


def test_save_bakes_a_vae(host):
    board = Board(host)
    vae_dir = host.models_dir / "VAE"
    vae_dir.mkdir()
    from safetensors.torch import save_file

    source = host.models_dir / "sd15_photo.safetensors"
    with safe_open(str(source), "pt") as f:
        tensors = {k[len("first_stage_model."):]: f.get_tensor(k).float() for k in f.keys() if k.startswith("first_stage_model.")}
    save_file(tensors, str(vae_dir / "photo.vae.safetensors"))
    vae_title = next(v.title for v in host.vaes())
    message = html.unescape(board.on_save("baked", "fp16", vae_title, False, *_values(board)))
    assert "saved baked.safetensors" in message, message
    with safe_open(str(host.models_dir / "baked.safetensors"), "pt") as f:
        for key, value in list(tensors.items())[:5]:
            assert torch.equal(f.get_tensor("first_stage_model." + key), value.to(torch.float16))
    assert load_recipe(host.models_dir / "baked.safetensors").vae.endswith("photo.vae.safetensors")


def test_cancel_during_save_leaves_no_file(host):
    board = Board(host)

    def progress(fraction, desc=None):
        board.on_cancel()  # the user presses Cancel while the first keys are written

    message = html.unescape(board.on_save("cancelled", "fp16", NO_VAE, False, *_values(board), progress=progress))
    assert "cancelled" in message
    assert not any(p.name.startswith("cancelled") for p in host.models_dir.iterdir())
    assert not board.session.save.running


def test_bad_inputs_give_one_clear_message(host):
    board = Board(host)
    mismatch = html.unescape(board.on_change(*_values(board, b="sdxl_pony.safetensors")))
    assert "SDXL but model A is SD1.x" in mismatch
    (host.models_dir / "sd15_anime.safetensors").unlink()
    missing = html.unescape(board.on_change(*_values(board)))
    assert "not in the checkpoint list" in missing or "missing" in missing
    assert "pick model B" in html.unescape(board.on_change(*_values(board, b=None)))


def test_compare_and_curve_make_figures(host):
    board = Board(host)
    figure, message = board.on_compare("sd15_base.safetensors", "sd15_anime.safetensors")
    assert figure is not None and "compared" in message
    assert board.curve("sdxl", dict.fromkeys(ALL_BLOCKS, 0.5)) is not None


def test_preview_is_hidden_without_a_sampler(host):
    ui, board = build(host, standalone=True)
    config = ui.get_config_file()
    group = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "mergeboard_preview_group")
    assert group["props"].get("visible") is False
    _, _, message = board.on_preview("", "", 1, 1, 64, 64, 5.0, *_values(board))
    assert "no sampler" in message


def test_concurrent_saves_are_refused(host, monkeypatch):
    board = Board(host)
    import lib_merge.engine as engine

    started, release = threading.Event(), threading.Event()
    real = engine.merge

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge", slow)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("m", board.on_save("one", "fp16", NO_VAE, False, *_values(board))))
    t.start()
    assert started.wait(30)
    assert "already running" in board.on_save("two", "fp16", NO_VAE, False, *_values(board))
    release.set()
    t.join(60)
    assert "saved one" in out["m"]


def _threads_of_a_new_thread() -> int:
    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def test_saving_leaves_torch_threads_of_the_host_alone(host):
    """torch keeps the last set_num_threads for every thread initialised later; a save must not
    leave the WebUI's future generation threads single-threaded."""
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run single-threaded; a WebUI does not
    try:
        board = Board(host)
        assert "saved" in board.on_save("threads", "fp16", NO_VAE, False, *_values(board))
        assert _threads_of_a_new_thread() == 2
    finally:
        torch.set_num_threads(original)
