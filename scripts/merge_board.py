"""Merge Board entry point for A1111 1.10 and Forge: the tab (on_ui_tabs), one settings section
(on_ui_settings), the X/Y/Z merge axes (on_before_ui) and the live-preview hook (an always-on
script with no UI of its own). Everything else is in lib_merge.webui."""
import gradio as gr  # noqa: F401  (the WebUI has it; imported here so a missing gradio fails loudly)

from modules import script_callbacks, scripts

from lib_merge.webui.hosts import detect as hostdetect
from lib_merge.webui.board.live_session import LiveSession

if hostdetect.is_forge():
    from lib_merge.webui.board.host_forge import ForgeHost as _Host
else:
    from lib_merge.webui.board.host_a1111 import A1111Host as _Host

HOST = _Host()
SESSION = LiveSession(HOST, log=lambda message: print(message, flush=True))


def on_ui_tabs():
    from lib_merge.webui.board import ui as board

    ui, _ = board.build(HOST, SESSION)
    return [(ui, "Merge Board", "mergeboard")]


def on_ui_settings():
    from lib_merge.webui.board.host_a1111 import add_settings

    add_settings()


def on_before_ui():
    from lib_merge.webui.hosts.xyz import register_axes
    from lib_merge.webui.board.xyz import axes

    register_axes(axes(SESSION), log=lambda message: print(message, flush=True))


def on_model_loaded(sd_model):
    SESSION.model_loaded(sd_model)


def on_script_unloaded():
    # "Reload UI" re-imports this file: leave model A in place for the new session
    try:
        SESSION.shutdown()
    except Exception as exc:
        print(f"[Merge Board] could not restore model A on reload: {exc}", flush=True)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_script_unloaded(on_script_unloaded)


class MergeBoardLivePreview(scripts.Script):
    """Patches the loaded model before the prompts are encoded (A1111) and again right before
    sampling when the board's live preview is on or an X/Y/Z merge axis is in use; already under
    the WebUI's queue lock, so it never takes it."""

    def title(self):
        return "Merge Board live preview"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        # A1111 computes the prompts' conditioning after this hook and before the sampling hook:
        # the text encoders must hold the merge by now. (Forge's live target is the U-Net alone.)
        if not hostdetect.is_forge():
            SESSION.before_generation(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        # Also here: the model may have changed since `process` (a hires-fix checkpoint, Forge's
        # load at the first generation); when nothing changed this finds nothing to patch.
        SESSION.before_generation(p)

    def postprocess(self, p, processed, *args):
        SESSION.after_generation(p, HOST.xyz_grid_finished())
