"""The Merge Board builds and wires its events on the installed gradio (tools/dev runs this file
under gradio 4.40 in .venv and again under gradio 3.41 in .venv-gradio3); its handlers work on
the standalone host over a folder of demo-layout checkpoints."""
from __future__ import annotations

import html
from pathlib import Path
import threading

import pytest
import torch
from safetensors import safe_open

gr = pytest.importorskip("gradio")

from lib_merge.demo import ensure_demo_models  # noqa: E402
from lib_merge.recipe import load_recipe  # noqa: E402
from lib_merge.webui.board import base as board_base, gradio_compat as board_gradio  # noqa: E402
from lib_merge.webui.board.ui import Board, build  # noqa: E402
from lib_merge.webui.board.base import ALL_BLOCKS, NO_VAE  # noqa: E402
from lib_merge.webui.board.standalone import StandaloneHost  # noqa: E402


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
        ("input", "mergeboard_preset"), ("release", "mergeboard_alpha"), ("submit", "mergeboard_weights"),
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
    # a B that fits A is left alone (the value passed in may be older than the user's pick since)
    assert picker_updates[0].get("value", "sdxl_pony.safetensors") == "sdxl_pony.safetensors"
    cleared = board.on_model_a("sdxl_base.safetensors", "", 0.5, "sd15_anime.safetensors", None, None, None, None)
    assert cleared[0]["value"] is None  # an SD1 B does not fit an SDXL A
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
    new = board.on_slider("IN04", 0.25, text, "sd15_base.safetensors", 0.5)[len(ALL_BLOCKS)]
    values = new["value"].split(",")
    assert values[0] == "1.5" and values[5] == "0.25"
    out = board.on_weights_text("GRAD_V,IN04=0.3", "sd15_base.safetensors", 0.5)
    sliders, string = out[:len(ALL_BLOCKS)], out[len(ALL_BLOCKS)]
    assert sliders[ALL_BLOCKS.index("IN04")]["value"] == 0.3
    assert string["value"].split(",")[5] == "0.3"
    bad = board.on_weights_text("IN99=1", "sd15_base.safetensors", 0.5)
    assert "unknown block" in html.unescape(bad[-1]) and all(u == gr.update() for u in bad[:len(ALL_BLOCKS) + 1])
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


# -- one path for the blocks (issue 9: items 13-15, 17, 18, 20) ---------------------------------------
N_BLOCKS = len(ALL_BLOCKS)
A15 = "sd15_base.safetensors"


def _block_area(out):
    """(slider values by block, weight string, preset label, field message) of a block_state list."""
    sliders = {name: u.get("value") for name, u in zip(ALL_BLOCKS, out[:N_BLOCKS])}
    return sliders, out[N_BLOCKS]["value"], out[N_BLOCKS + 2]["value"], html.unescape(out[N_BLOCKS + 3])


def test_alpha_sets_every_block_and_the_sliders_reach_it(host):
    board = Board(host)
    sliders, text, label, _ = _block_area(board.on_alpha(-0.42, A15))
    assert set(text.split(",")) == {"-0.42"} and len(text.split(",")) == 26
    assert all(v == -0.42 for v in sliders.values())  # not clamped to 0 any more: one range for α and blocks
    assert label == "custom"
    assert all(u == gr.update() for u in board.on_alpha(None, A15))  # a half-typed number applies nothing


def test_loading_a_recipe_moves_the_sliders_and_says_so(host):
    board = Board(host)
    weights = ",".join(["0.5"] * 5 + ["0.86"] + ["0.5"] * 20)
    assert "saved" in board.on_save("in04", "fp16", NO_VAE, False, *_values(board, weights=weights))
    out = board.on_load_recipe("in04.safetensors")
    sliders, text, label, _ = _block_area(out[-1 - (N_BLOCKS + 4):-1])
    assert text.split(",")[5] == "0.86" and sliders["IN04"] == 0.86 and sliders["IN03"] == 0.5
    assert "loaded the recipe of in04.safetensors" in html.unescape(out[-1])
    assert len(out) == len(board_base.LETTERS) + 5 + len(board.param_names) + N_BLOCKS + 4 + 1


def test_preset_label_follows_the_blocks(host):
    board = Board(host)
    _, text, label, _ = _block_area(board.on_preset("GRAD_V", A15))
    assert label == "GRAD_V"
    _, _, label, _ = _block_area(board.on_slider("IN04", 0.19, text, A15, 0.5))
    assert label == "custom"
    _, _, label, _ = _block_area(board.on_weights_text("GRAD_V", A15, 0.5))
    assert label == "GRAD_V"
    assert all(u == gr.update() for u in board.on_preset("custom", A15))  # the label is not a preset to apply


def test_a_bad_weight_string_is_reported_at_the_field(host):
    board = Board(host)
    out = board.on_weights_text("IN99=1", A15, 0.5)
    assert "unknown block" in html.unescape(out[N_BLOCKS + 3])  # the field's own message line
    ui, board = build(host, standalone=True)
    config = ui.get_config_file()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    dep = next(d for d in config["dependencies"] if any(
        (t[1] if isinstance(t, (list, tuple)) else d.get("trigger")) == "submit" for t in d["targets"]))
    assert "mergeboard_weights_msg" in [ids[o] for o in dep["outputs"]]


def test_sliders_and_alpha_share_one_range(host):
    ui, board = build(host, standalone=True)
    for name in ["alpha", "beta"] + [f"w_{b}" for b in ALL_BLOCKS]:
        props = next(c["props"] for c in ui.get_config_file()["components"] if c.get("props", {}).get("elem_id") == f"mergeboard_{name}")
        assert (props["minimum"], props["maximum"]) == (-1.0, 2.0), name


def test_state_dependent_controls_are_not_saved_by_the_hosts(host):
    """A1111/Forge's ui_loadsave skips components with do_not_save_to_config; model A, the live
    switch, the sliders' values and ranges and the preview size must come from the running server."""
    _, board = build(host, standalone=True)
    c = board.components
    for component in c["pickers"] + [c["live"], c["weights"], c["alpha"], c["preset"], c["width"], c["height"]] + list(c["sliders"].values()):
        assert getattr(component, "do_not_save_to_config", False), component.elem_id
    assert not getattr(c["save_dtype"], "do_not_save_to_config", False)  # a user preference stays saveable


def test_page_load_syncs_model_a_and_the_live_switch(host, monkeypatch):
    _, board = build(host, standalone=True)
    board.session.set_enabled(True)
    monkeypatch.setattr(host, "loaded_checkpoint", lambda: host.models_dir / "sdxl_base.safetensors")
    out = board.on_page_load("sd15_base.safetensors", None, None, None, None, None)
    assert out[0]["value"] == "sdxl_base.safetensors"
    live, status = out[-2], html.unescape(out[-1])
    assert live["value"] is True and "Live preview on" in status
    (host.models_dir / "late.safetensors").hardlink_to(host.models_dir / "sd15_base.safetensors")
    assert "late.safetensors" in board.on_page_load(None, None, None, None, None, None)[0]["choices"]


def test_method_help_is_whole(host):
    board = Board(host)
    text = board.on_method("ties")[-1]["value"]
    assert text.rstrip().endswith(".") and "zer" in text and "\n" not in text
    assert len(text) > 300


def test_save_and_load_write_one_console_line(host, capsys):
    board = Board(host)
    assert "saved" in board.on_save("logged", "fp16", NO_VAE, False, *_values(board))
    board.on_load_recipe("logged.safetensors")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[Merge Board]")]
    assert any("saved" in line and "logged.safetensors" in line and " s" in line for line in lines), lines
    assert any("loaded the recipe of logged.safetensors" in line for line in lines), lines


def test_heatmap_rows_have_their_own_scale_from_zero(host):
    from types import SimpleNamespace

    from lib_merge.webui.board.plots import heatmap

    blocks = {"IN00": SimpleNamespace(relative_difference=0.12, cosine=0.999),
              "IN01": SimpleNamespace(relative_difference=0.15, cosine=0.5)}
    fig = heatmap(SimpleNamespace(blocks=blocks))
    images = [ax.images[0] for ax in fig.axes if ax.images and ax.get_yticklabels()]
    rel = images[0]
    assert rel.norm.vmin == 0.0 and rel.norm.vmax == pytest.approx(0.15)
    # 0.12 and 0.15 sit at 80 % and 100 % of one scale, not at its two ends
    assert rel.norm(0.12) == pytest.approx(0.8)
    assert len(fig.axes) == 4  # two rows, each with its colour bar


def _lora_folder(host, rank=2, seed=4, name="style.safetensors"):
    from safetensors.torch import save_file

    from lib_merge.io.reader import open_checkpoint
    from lib_merge.lora.synthetic import synthetic_lora

    folder = host.models_dir / "loras"
    folder.mkdir(exist_ok=True)
    with open_checkpoint(host.models_dir / "sd15_base.safetensors") as reader:
        save_file(synthetic_lora(reader.shapes(), "sd1", rank=rank, seed=seed), str(folder / name))
    return folder / name


def test_save_offers_fp8_and_writes_an_fp8_unet(host):
    ui, board = build(host, standalone=True)
    config = ui.get_config_file()
    dtype = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "mergeboard_dtype")
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in dtype["props"]["choices"]]
    assert {"fp8_e4m3fn", "fp8_e5m2"} <= set(choices)
    assert "saved" in board.on_save("eight", "fp8_e4m3fn", NO_VAE, False, *_values(board))
    with safe_open(str(host.models_dir / "eight.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == "F8_E4M3"
    assert all(d in ("F16", "I64") for k, d in dtypes.items() if k.startswith(("cond_stage_model.", "first_stage_model.")))


def test_lora_picker_lists_the_lora_folder_and_save_bakes_the_list(host, tmp_path):
    from lib_merge.cli import main
    from tests.files import load_tensors

    lora = _lora_folder(host)
    board = Board(host)
    assert board.lora_titles() == ["style.safetensors"]
    assert "loras/style.safetensors" not in [c.title for c in host.checkpoints()]  # not a checkpoint
    listing, message = board.on_lora_add("style.safetensors", 0.7, "IN04=0", "")
    assert listing == "style.safetensors | 0.7 | IN04=0" and "live preview and into Save" in html.unescape(message)
    message = html.unescape(board.on_save("with_lora", "fp32", NO_VAE, False, *_values(board), loras=listing))
    assert "saved with_lora.safetensors" in message and "1 LoRA(s) baked" in message, message
    recipe = load_recipe(host.models_dir / "with_lora.safetensors")
    assert [(Path(x["path"]).name, x["strength"], x["weights"]) for x in recipe.loras] == [("style.safetensors", 0.7, "IN04=0")]
    reference = tmp_path / "cli.safetensors"
    assert main(["merge", str(host.models_dir / "sd15_base.safetensors"), str(host.models_dir / "sd15_anime.safetensors"),
                 "--alpha", "0.5", "--lora", f"{lora}:0.7", "--lora-weights", "IN04=0", "--dtype", "fp32",
                 "-o", str(reference), "--no-hash"]) == 0
    got, want = load_tensors(host.models_dir / "with_lora.safetensors"), load_tensors(reference)
    plain = load_tensors(host.models_dir / "sd15_base.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert not torch.equal(got[key], plain[key].float())


def test_the_lora_list_is_part_of_the_boards_recipe(host):
    """The list after the parameters (as ui.py passes it) becomes the recipe's loras, so the live
    session follows it; a bad line leaves the session on its last valid recipe."""
    lora = _lora_folder(host)
    board = Board(host)
    board.on_change(*_values(board), "style.safetensors | 0.7 | IN04=0")
    assert [(x["path"], x["strength"], x["weights"]) for x in board.session.board_recipe.loras] == [(str(lora), 0.7, "IN04=0")]
    message = html.unescape(board.on_change(*_values(board), "style.safetensors | strong"))
    assert "not a number" in message and board.session.board_recipe.loras[0]["strength"] == 0.7
    board.on_change(*_values(board), "")
    assert board.session.board_recipe.loras == ()
    from lib_merge.webui.board.host import recipe_infotext

    text = recipe_infotext(board.recipe(board.parse_ui(_values(board) + ["style.safetensors | 0.7"])))
    assert '"loras":[{"path":"style.safetensors","strength":0.7}]' in text and str(host.models_dir) not in text


def test_lora_list_errors_and_a_lora_as_output_lose_nothing(host):
    _lora_folder(host)
    board = Board(host)
    for listing, expected in (("missing.safetensors | 1", "not in the LoRA folder"),
                              ("style.safetensors | strong", "not a number"),
                              ("a | 1 | b | c", "NAME | STRENGTH")):
        message = html.unescape(board.on_save("x", "fp16", NO_VAE, False, *_values(board), loras=listing))
        assert "error" in message and expected in message, message
    assert not (host.models_dir / "x.safetensors").exists()


def test_extract_lora_writes_into_the_lora_folder_only(host):
    _lora_folder(host)
    board = Board(host)
    picker, message = board.on_extract("sd15_base.safetensors", "sd15_anime.safetensors", 4, "anime_r4", False)
    message = html.unescape(message)
    assert "extracted anime_r4.safetensors" in message, message
    out = host.models_dir / "loras" / "anime_r4.safetensors"
    assert out.is_file() and "anime_r4.safetensors" in picker["choices"] and picker["value"] == "anime_r4.safetensors"
    with safe_open(str(out), "pt") as f:
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
        assert ranks == {4} and f.metadata()["ss_network_dim"] == "4"
    _, again = board.on_extract("sd15_base.safetensors", "sd15_anime.safetensors", 4, "anime_r4", False)
    assert "already exists" in html.unescape(again)
    for name in ("../anime", "/tmp/anime", "sub/anime", ""):
        _, bad = board.on_extract("sd15_base.safetensors", "sd15_anime.safetensors", 4, name, True)
        assert "error" in bad, name
    assert sorted(p.name for p in (host.models_dir / "loras").iterdir()) == ["anime_r4.safetensors", "style.safetensors"]
    assert not list(host.models_dir.parent.glob("anime*")) and not Path("/tmp/anime.safetensors").exists()
