"""The Merge Board on the A1111 and Forge stand-ins (tests/hosts, following webui-api.md
and the real sources): registration, the live-preview hook under the queue lock, LoRA backups,
checkpoint changes, X/Y/Z merge axes, Preview, Save and the bad-input paths."""
from __future__ import annotations

import re

import errno
import html
import os
import threading
import types

import pytest
import torch
from safetensors.torch import load_file

from lib_merge.engine import merge
from lib_merge.recipe import Recipe, load_recipe
from tests.hosts import installed, load_entry_script, load_xyz_grid
from tests.hosts.common.checkpoints import PREFIX, tiny_unet, write_checkpoint

WIDTH = 16


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "a": write_checkpoint(root / "a.safetensors", "sd1", 0, width=WIDTH),
        "b": write_checkpoint(root / "b.safetensors", "sd1", 1, width=WIDTH),
        "xl": write_checkpoint(root / "xl.safetensors", "sdxl", 2, width=WIDTH),
    }


def _models_dir(tmp_path, model_files):
    folder = tmp_path / "Stable-diffusion"
    folder.mkdir()
    for name, path in model_files.items():
        os.link(path, folder / path.name)
    return folder


def _unet_of(path, dtype=torch.float16):
    sd = load_file(str(path))
    unet = tiny_unet("sd1", 0, torch.float32, width=WIDTH)
    unet.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)})
    return unet.to(dtype)


def _bits_equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v.reshape(-1).view(torch.uint8), sb[k].reshape(-1).view(torch.uint8))]


def _board_values(env, b_title=None, weights="", alpha=0.5, method="weighted_sum"):
    board = env.board
    values = [env.title("a"), b_title or env.title("b"), None, None, None, None, method, alpha, 0.5, weights, 0]
    values += [board.param_specs[n].default for n in board.param_names]
    return values


def _merged_unet(env, tmp_path, recipe_weights=None, alpha=0.5, name="ref.safetensors"):
    recipe = Recipe("weighted_sum", (str(env.path("a")), str(env.path("b"))), alpha=alpha, weights=recipe_weights)
    out = merge(recipe, tmp_path / name, hash_inputs=False, hash_output=False, durable=False, overwrite=True)
    return _unet_of(out.path)


class Env(types.SimpleNamespace):
    def title(self, key):
        from modules import sd_models

        for info in sd_models.checkpoints_list.values():
            if os.path.basename(info.filename) == os.path.basename(self.files[key]):
                return info.title
        raise KeyError(key)

    def path(self, key):
        return self.models / os.path.basename(self.files[key])

    def p(self, **kw):
        from modules import processing, scripts

        return processing.StableDiffusionProcessingTxt2Img(prompt=kw.pop("prompt", "a cat"), scripts=scripts.scripts_txt2img, **kw)

    def generate(self, **kw):
        """One txt2img run as the WebUI does it: under the queue lock (wrap_gradio_gpu_call)."""
        from modules import call_queue, processing

        with call_queue.queue_lock:
            return processing.process_images(self.p(**kw))


def _setup(host, tmp_path, model_files):
    from modules import scripts, sd_models, shared

    folder = _models_dir(tmp_path, model_files)
    sd_models.model_path = str(folder)
    sd_models.list_models()
    env = Env(models=folder, files=model_files, sd_models=sd_models, shared=shared)
    shared.opts.sd_model_checkpoint = env.title("a")
    return env, scripts


@pytest.fixture
def a1111(tmp_path, model_files):
    with installed("a1111"):
        env, scripts = _setup("a1111", tmp_path, model_files)
        env.sd_models.unet_factory = lambda path: tiny_unet("sd1", 0, torch.float16, width=WIDTH)
        yield from _started(env, scripts)


@pytest.fixture
def forge(tmp_path, model_files):
    with installed("forge"):
        env, scripts = _setup("forge", tmp_path, model_files)
        from backend.diffusion_engine.base import ForgeDiffusionEngine

        def engine(info, storage_dtype):
            unet = _unet_of(info.filename, torch.float16)
            if storage_dtype is not None:
                unet = unet.to(storage_dtype)
            return ForgeDiffusionEngine(unet, storage_dtype or torch.float16)

        env.sd_models.engine_factory = engine
        env.sd_models.refresh_model_loading_parameters()
        yield from _started(env, scripts)


def _started(env, scripts):
    """Load our entry script and X/Y/Z the way the host does, build the board; shut down after."""
    env.module = load_entry_script()
    env.xyz = load_xyz_grid()
    from modules import script_callbacks

    script_callbacks.before_ui_callback()
    scripts.scripts_txt2img.initialize()
    from lib_merge.webui.board.ui import Board

    env.board = Board(env.module.HOST, env.module.SESSION)
    yield env
    env.module.SESSION.shutdown()


def _current_unet(env):
    model = env.sd_models.model_data.sd_model
    if hasattr(model, "forge_objects"):
        return model.forge_objects.unet.model.diffusion_model
    return model.model.diffusion_model


# ---------------------------------------------------------------------------------------------- A1111
def test_a1111_entry_registers_tab_settings_and_axes(a1111):
    from modules import script_callbacks, shared

    tabs = script_callbacks.ui_tabs_callback()
    assert [(title, elem) for _, title, elem in tabs] == [("Merge Board", "mergeboard")]
    script_callbacks.ui_settings_callback()
    ours = {k: v for k, v in shared.opts.data_labels.items() if k.startswith("mergeboard_")}
    assert set(ours) == {"mergeboard_output_dir", "mergeboard_dtype", "mergeboard_threads", "mergeboard_device", "mergeboard_cache_mb"}
    assert {v.section for v in ours.values()} == {("mergeboard", "Merge Board")}
    labels = [o.label for o in a1111.xyz.axis_options]
    for label in ("Merge alpha", "Merge block weights", "Merge method", "Merge model B", "Merge block IN04", "Merge block OUT11"):
        assert label in labels


def test_a1111_live_preview_patches_inside_generation_and_restores_from_the_tab(a1111, tmp_path):
    from modules import call_queue

    board, session = a1111.board, a1111.module.SESSION
    values = _board_values(a1111)
    a1111.generate()  # loads A
    original = _unet_of(a1111.path("a"))
    assert "Live preview on" in board.on_live(True, *values)
    result = a1111.generate()  # the hook runs under the queue lock and must not take it again
    assert _bits_equal(_current_unet(a1111), _merged_unet(a1111, tmp_path)) == []
    assert "Merge recipe: " in result.infotexts[0] and "weighted_sum" in result.infotexts[0]
    before = call_queue.queue_lock.acquisitions
    board.on_live(False, *values)  # tab: restore under the queue lock
    assert call_queue.queue_lock.acquisitions == before + 1
    assert _bits_equal(_current_unet(a1111), original) == []
    assert not session.patched
    result = a1111.generate()
    assert "Merge recipe" not in result.infotexts[0]


def test_a1111_switching_live_off_during_a_generation_answers_at_once(a1111):
    """Issue 9 item 19: in the real A1111 the status stayed "Live preview on" until the running
    generation released the queue lock; the switch answers now and A comes back right after."""
    import threading
    import time

    from modules import call_queue

    board, session = a1111.board, a1111.module.SESSION
    values = _board_values(a1111)
    a1111.generate()
    original = _unet_of(a1111.path("a"))
    board.on_live(True, *values)
    a1111.generate()
    assert session.patched
    held, release = threading.Event(), threading.Event()

    def generation():  # another request holding the queue lock, as a running txt2img does
        with call_queue.queue_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=generation)
    holder.start()
    held.wait(10)
    answer = []
    switch = threading.Thread(target=lambda: answer.append(board.on_live(False, *values)), daemon=True)
    switch.start()
    switch.join(2)
    try:
        assert answer and "Live preview off" in answer[0] and "as soon as the running generation ends" in answer[0]
        assert session.patched  # nothing touched the weights under the running generation
    finally:
        release.set()
        holder.join(10)
    deadline = time.monotonic() + 10
    while session.patched and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not session.patched
    assert _bits_equal(_current_unet(a1111), original) == []


def test_a1111_lora_backups_stay_consistent(a1111, tmp_path):
    import networks

    networks.install()
    a1111.generate()
    unet = _current_unet(a1111)
    deltas = {name: torch.full_like(m.weight, 0.125) for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    networks.loaded_networks[:] = [networks.Network("style", deltas)]

    def with_lora(reference):
        networks.network_reset_cached_weight  # noqa: B018  (same code path as the WebUI)
        for m in reference.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                networks.network_reset_cached_weight(m)
        networks.apply_to(reference)
        return reference

    a1111.generate()  # LoRA applied on A
    values = _board_values(a1111, weights="0,0,0,0,0,0.7,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0")
    a1111.board.on_change(*values)
    a1111.board.on_live(True, *values)
    a1111.generate()  # IN04 merged; every module carries the LoRA exactly once
    expected = with_lora(_merged_unet(a1111, tmp_path, recipe_weights=values[9], alpha=0.5))
    assert _bits_equal(_current_unet(a1111), expected) == []
    a1111.board.on_live(False, *values)
    a1111.generate()
    assert _bits_equal(_current_unet(a1111), with_lora(_unet_of(a1111.path("a")))) == []
    networks.loaded_networks.clear()
    a1111.generate()
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []


def test_a1111_checkpoint_change_drops_or_restores_the_live_state(a1111, tmp_path):
    board = a1111.board
    values = _board_values(a1111)
    board.on_live(True, *values)
    a1111.generate()
    model = a1111.sd_models.model_data.sd_model
    # sd_checkpoints_limit == 1: B's weights are loaded into the same object -> nothing written back
    a1111.sd_models.reload_model_weights(info=a1111.sd_models.get_closet_checkpoint_match(a1111.title("b")))
    assert a1111.sd_models.model_data.sd_model is model
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("b"))) == []
    result = a1111.generate()  # B is loaded, not A: left alone, and the infotext and the board say so
    assert "skipped" in result.infotexts[0]
    assert "is loaded, not model A" in a1111.module.SESSION.status_line()
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("b"))) == []
    a1111.sd_models.reload_model_weights(info=a1111.sd_models.get_closet_checkpoint_match(a1111.title("a")))
    a1111.generate()
    assert _bits_equal(_current_unet(a1111), _merged_unet(a1111, tmp_path)) == []


def test_a1111_vae_reload_keeps_the_live_state(a1111, tmp_path):
    """A1111 calls on_model_loaded after loading only a VAE (sd_vae.reload_vae_weights): the U-Net
    still holds the merge, so the session must neither forget it nor take it for A's originals."""
    board = a1111.board
    values = _board_values(a1111)
    a1111.generate()
    board.on_live(True, *values)
    a1111.generate()
    model = a1111.sd_models.model_data.sd_model
    from modules import script_callbacks

    script_callbacks.model_loaded_callback(model)  # what sd_vae.reload_vae_weights ends with
    assert a1111.module.SESSION.patched
    a1111.generate()
    assert _bits_equal(_current_unet(a1111), _merged_unet(a1111, tmp_path)) == []
    board.on_live(False, *values)
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []


def test_a1111_model_unloaded_while_patched(a1111):
    board = a1111.board
    values = _board_values(a1111)
    board.on_live(True, *values)
    a1111.generate()
    a1111.sd_models.unload_model_weights()
    message = board.on_live(False, *values)
    assert "could not" not in message
    a1111.generate()  # a fresh model object is loaded from A's file
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []


def test_a1111_xyz_block_axis_patches_one_block_per_cell_and_restores(a1111):
    session = a1111.module.SESSION
    values = _board_values(a1111)
    a1111.board.on_change(*values)
    a1111.generate()
    reports = []
    sync = session.sync

    def spy(*args, **kwargs):
        report = sync(*args, **kwargs)
        reports.append(report)
        return report

    session.sync = spy
    axis = next(o for o in a1111.xyz.axis_options if o.label == "Merge block IN04")
    from modules import scripts

    p = a1111.p()
    with __import__("modules.call_queue", fromlist=["x"]).queue_lock:
        results = a1111.xyz.Script().run_grid(p, axis, ["0", "0.5", "1"])
    infos = [r.infotexts[0] for r in results]
    assert all("Merge recipe" in i for i in infos)
    assert ["Merge block IN04: 0," in i or i.endswith("Merge block IN04: 0") for i in infos][0]
    assert "Merge block IN04: 0.5" in infos[1] and "Merge block IN04: 1" in infos[2]
    # A1111 syncs before the prompts are encoded and again before sampling: the second finds nothing
    cell_reports = [r for r in reports if r is not None and r.keys]
    assert [r.keys for r in reports if r is not None].count(0) == 3
    assert cell_reports[1].blocks == ["IN04"] and cell_reports[2].blocks == ["IN04"]
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []  # restored after the grid
    assert not session.patched
    del scripts


def test_a1111_preview_button_uses_the_host_processing(a1111, tmp_path, capsys):
    board = a1111.board
    values = _board_values(a1111)
    image, infotext, status = board.on_preview("", "", 3, 4, 64, 64, 5.0, *values)
    assert image is not None and "Merge recipe" in infotext
    merged = _merged_unet(a1111, tmp_path)
    from modules.processing import fingerprint

    assert image.info["fingerprint"] == fingerprint(merged)
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []  # live preview off: restored
    # one console line for the patch (blocks, tensors, ms) and one for the restore
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[Merge Board]")]
    assert any(re.search(r"patched \d+ tensors in \d+ block\(s\) .* in \d+ ms", line) for line in lines), lines
    assert any(re.search(r"restored model A \(\d+ tensors in \d+ ms\)", line) for line in lines), lines


def test_a1111_save_refreshes_the_checkpoint_list_and_recipe_loads_back(a1111):
    board = a1111.board
    values = _board_values(a1111, weights="GRAD_V")
    message = board.on_save("merged one", "fp16", None, False, *values)
    assert "saved merged one.safetensors" in message, message
    path = a1111.models / "merged one.safetensors"
    assert path.is_file()
    assert any(info.filename == str(path) for info in a1111.sd_models.checkpoints_list.values())
    recipe = load_recipe(path)
    assert recipe.method == "weighted_sum" and recipe.weights is not None
    loaded = board.on_load_recipe(next(i.title for i in a1111.sd_models.checkpoints_list.values() if i.filename == str(path)))
    assert loaded[0]["value"] == a1111.title("a") and loaded[1]["value"] == a1111.title("b")
    assert "loaded the recipe" in loaded[-1]
    again = board.on_save("merged one", "fp16", None, False, *values)
    assert "already exists" in again


def test_a1111_refresh_and_save_keep_the_selected_checkpoint(a1111, monkeypatch):
    """Both hosts' list_models() make a --ckpt file the selected checkpoint again; the board's
    refresh and its save refresh the list without switching the user's model at the next generation."""
    from modules import shared

    monkeypatch.setattr(shared.cmd_opts, "ckpt", str(a1111.path("a")))
    shared.opts.data["sd_model_checkpoint"] = a1111.title("b")
    a1111.board.on_refresh(a1111.title("a"), a1111.title("b"))
    assert shared.opts.data["sd_model_checkpoint"] == a1111.title("b")
    assert "saved kept.safetensors" in a1111.board.on_save("kept", "fp16", None, False, *_board_values(a1111))
    assert shared.opts.data["sd_model_checkpoint"] == a1111.title("b")


@pytest.mark.parametrize("name, fragment", [
    ("../escape", "'..'"), ("sub/dir", "separator"), ("/abs/path", "absolute"), ("a\\b", "separator"), ("", "type a name"),
])
def test_a1111_save_names_that_escape_the_folder_are_rejected(a1111, name, fragment):
    message = html.unescape(a1111.board.on_save(name, "fp16", None, False, *_board_values(a1111)))
    assert fragment in message and "error" in message
    assert sorted(p.name for p in a1111.models.iterdir()) == ["a.safetensors", "b.safetensors", "xl.safetensors"]


def test_a1111_full_disk_during_save_leaves_nothing(a1111, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    message = a1111.board.on_save("big", "fp16", None, False, *_board_values(a1111))
    assert "not enough disk space" in message
    assert sorted(p.name for p in a1111.models.iterdir()) == ["a.safetensors", "b.safetensors", "xl.safetensors"]


def test_a1111_architecture_mismatch_is_reported(a1111):
    values = _board_values(a1111, b_title=a1111.title("xl"))
    message = a1111.board.on_live(True, *values)
    assert "SDXL" in message or "SD1" in message
    a1111.generate()
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []


def test_a1111_generation_while_saving(a1111, monkeypatch):
    import lib_merge.engine as engine

    release = threading.Event()
    started = threading.Event()
    real = engine.merge

    def slow_merge(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge", slow_merge)
    values = _board_values(a1111)
    a1111.board.on_live(True, *values)
    out = {}
    saver = threading.Thread(target=lambda: out.setdefault("m", a1111.board.on_save("during", "fp16", None, False, *values)))
    saver.start()
    assert started.wait(30)
    assert "Saving during.safetensors" in a1111.module.SESSION.status_line()
    assert "already running" in a1111.board.on_save("other", "fp16", None, False, *values)
    a1111.generate()  # runs alongside with the live merge
    assert a1111.module.SESSION.patched
    release.set()
    saver.join(60)
    assert "saved during.safetensors" in out["m"]


def test_a1111_reload_ui_restores_model_a(a1111):
    from modules import script_callbacks

    values = _board_values(a1111)
    a1111.board.on_live(True, *values)
    a1111.generate()
    script_callbacks.script_unloaded_callback()
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []


# ---------------------------------------------------------------------------------------------- Forge
def test_forge_model_not_loaded_until_first_generation(forge):
    host = forge.module.HOST
    assert host.live_target() is None
    assert any("first generation" in n for n in host.notes())
    message = forge.board.on_live(True, *_board_values(forge))
    assert "applied at the first generation" in message
    forge.generate()
    assert forge.module.SESSION.patched


def test_forge_live_preview_with_lora_backups(forge, tmp_path):
    from modules import processing

    values = _board_values(forge, weights="0,0,0.4,0,0,0.7,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0")  # IN01, IN04
    forge.generate()
    kmodel = forge.sd_models.model_data.sd_model.forge_objects.unet.model
    names = [n for n, _ in kmodel.named_parameters() if n.endswith(".weight") and ".4." in n][:6]
    names += [n for n, _ in kmodel.named_parameters() if "input_blocks.1." in n and n.endswith("weight")][:2]
    deltas = {n: torch.full(kmodel.get_parameter(n).shape, 0.25) for n in names}
    processing.active_loras[:] = [("style.safetensors", deltas)]
    forge.generate()  # LoRA merged into the shared KModel, backups kept
    assert set(kmodel.lora_loader.backup) == set(names)
    forge.board.on_change(*values)
    forge.board.on_live(True, *values)
    loader, forced = kmodel.lora_loader, []
    refresh = loader.refresh

    def counted(*args, **kwargs):
        forced.append(kwargs.get("force_refresh", False))
        return refresh(*args, **kwargs)

    loader.refresh = counted
    forge.generate()
    # backups in two blocks (IN01, IN04) were rewritten: the LoRA is re-applied once for the whole patch
    assert forced.count(True) == 1

    def with_lora(unet):
        with torch.no_grad():
            for n, d in deltas.items():
                t = unet.get_parameter(n[len("diffusion_model."):])
                t.copy_((t.float() + d).to(t.dtype))
        return unet

    expected = with_lora(_merged_unet(forge, tmp_path, recipe_weights=values[9]))
    assert _bits_equal(kmodel.diffusion_model, expected) == []
    forge.board.on_live(False, *values)
    assert _bits_equal(kmodel.diffusion_model, with_lora(_unet_of(forge.path("a")))) == []
    processing.active_loras.clear()
    forge.generate()
    assert _bits_equal(kmodel.diffusion_model, _unet_of(forge.path("a"))) == []


def test_forge_refuses_fp8_storage_with_one_message(forge, capsys):
    forge.sd_models.refresh_model_loading_parameters(unet_storage_dtype=torch.float8_e4m3fn)
    forge.board.on_live(True, *_board_values(forge))
    processed = forge.generate()  # the image is made without the merge: one line says why, no traceback
    out = capsys.readouterr()
    assert "Error running" not in out.out + out.err
    lines = [line for line in (out.out + out.err).splitlines() if "live preview needs float weights" in line]
    assert len(lines) == 1 and re.search("without the live merge.*float8_e4m3fn", lines[0])
    assert "Merge Board: skipped" in processed.infotexts[0]
    model = forge.sd_models.model_data.sd_model
    assert model.forge_objects.unet.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float8_e4m3fn


def test_forge_preview_runs_on_the_main_thread(forge, tmp_path):
    from modules.processing import fingerprint
    from modules_forge import main_thread

    seen = []
    session = forge.module.SESSION
    sync = session.sync

    def spy(*args, **kwargs):
        seen.append(threading.get_ident())
        return sync(*args, **kwargs)

    session.sync = spy
    image, infotext, _ = forge.board.on_preview("", "", 1, 2, 64, 64, 5.0, *_board_values(forge))
    assert image is not None, infotext
    assert "Merge recipe" in infotext
    assert image.info["fingerprint"] == fingerprint(_merged_unet(forge, tmp_path))
    assert seen and set(seen) <= main_thread.thread_ids


def test_forge_xyz_alpha_axis_restores_after_the_grid(forge):
    forge.board.on_change(*_board_values(forge))
    forge.generate()
    axis = next(o for o in forge.xyz.axis_options if o.label == "Merge alpha")
    from modules import call_queue

    with call_queue.queue_lock:
        results = forge.xyz.Script().run_grid(forge.p(), axis, ["0.25", "1"])
    assert "Merge alpha: 0.25" in results[0].infotexts[0] and "Merge alpha: 1" in results[1].infotexts[0]
    kmodel = forge.sd_models.model_data.sd_model.forge_objects.unet.model
    assert _bits_equal(kmodel.diffusion_model, _unet_of(forge.path("a"))) == []


@pytest.mark.parametrize("which", ["a1111", "forge"])
def test_lora_folder_is_the_hosts_lora_dir(which, request, tmp_path, monkeypatch):
    """Both hosts' Lora extension reads shared.cmd_opts.lora_dir (preload.py: --lora-dir, default
    models/Lora): the picker lists it, Extract LoRA writes there and nowhere else."""
    env = request.getfixturevalue(which)
    from modules import shared

    board = env.board
    default = env.models.parent / "Lora"  # models/Stable-diffusion → models/Lora when no --lora-dir
    monkeypatch.delattr(shared.cmd_opts, "lora_dir", raising=False)
    assert board.host.settings().lora_dir == default and board.lora_titles() == []
    chosen = tmp_path / "my loras"
    (chosen / "sub").mkdir(parents=True)
    (chosen / "sub" / "old.safetensors").write_bytes(b"")  # listed by name; never opened here
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(chosen), raising=False)
    assert board.host.settings().lora_dir == chosen and board.lora_titles() == ["sub/old.safetensors"]
    picker, message = board.on_extract(env.title("a"), env.title("b"), 2, "a_to_b", False)
    assert "extracted a_to_b.safetensors" in html.unescape(message), message
    assert (chosen / "a_to_b.safetensors").is_file() and "a_to_b.safetensors" in picker["choices"]
    assert not default.exists()


@pytest.mark.parametrize("which", ["a1111", "forge"])
def test_live_preview_bakes_the_boards_lora_list(which, request, tmp_path, monkeypatch):
    """The LoRA list is part of the board's recipe: the generation's model holds what Save writes
    (the LoRA in the block at 0 too), the infotext names it, removing it gives the plain merge and
    switching the preview off gives A — through each host's own write path."""
    env = request.getfixturevalue(which)
    from modules import shared
    from safetensors.torch import save_file

    from lib_merge.io.reader import open_checkpoint
    from lib_merge.lora.synthetic import synthetic_lora

    folder = tmp_path / "Lora"
    folder.mkdir()
    with open_checkpoint(env.path("a")) as reader:
        save_file(synthetic_lora(reader.shapes(), "sd1", rank=2, seed=4), str(folder / "style.safetensors"))
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(folder), raising=False)
    board = env.board
    values = _board_values(env, weights="IN04=0") + ["style.safetensors | 0.7"]
    env.generate()  # loads A
    board.on_change(*values)
    board.on_live(True, *values)
    result = env.generate()
    recipe = Recipe("weighted_sum", (str(env.path("a")), str(env.path("b"))), alpha=0.5, weights="IN04=0",
                    loras=({"path": str(folder / "style.safetensors"), "strength": 0.7},))
    saved = merge(recipe, tmp_path / "with_lora.safetensors", hash_inputs=False, hash_output=False, durable=False)
    assert _bits_equal(_current_unet(env), _unet_of(saved.path)) == []
    assert "style.safetensors" in result.infotexts[0]
    board.on_change(*values[:-1], "")
    env.generate()
    assert _bits_equal(_current_unet(env), _merged_unet(env, tmp_path, recipe_weights="IN04=0")) == []
    board.on_live(False, *values)
    assert _bits_equal(_current_unet(env), _unet_of(env.path("a"))) == []


def test_a_lora_damaged_between_generations_gives_a_and_says_so(a1111, tmp_path, monkeypatch, capsys):
    """The LoRA file breaks while the preview holds it: the next generation runs on A (as its
    infotext says: skipped), not on the previous merge, with one console line naming the file."""
    from modules import shared
    from safetensors.torch import save_file

    from lib_merge.io.reader import open_checkpoint
    from lib_merge.lora.synthetic import synthetic_lora

    folder = tmp_path / "Lora"
    folder.mkdir()
    lora = folder / "style.safetensors"
    with open_checkpoint(a1111.path("a")) as reader:
        save_file(synthetic_lora(reader.shapes(), "sd1", rank=2, seed=4), str(lora))
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(folder), raising=False)
    values = _board_values(a1111) + ["style.safetensors | 0.7"]
    a1111.generate()
    a1111.board.on_change(*values)
    a1111.board.on_live(True, *values)
    a1111.generate()
    assert a1111.module.SESSION.patched
    data = lora.read_bytes()
    lora.write_bytes(data[: len(data) // 2])  # a download cut short, say
    capsys.readouterr()
    processed = a1111.generate()
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "style.safetensors" in line]
    assert len(lines) == 1 and "without the live merge" in lines[0] and "Error running" not in out.out + out.err
    assert "Merge Board: skipped" in processed.infotexts[0]
    assert _bits_equal(_current_unet(a1111), _unet_of(a1111.path("a"))) == []
