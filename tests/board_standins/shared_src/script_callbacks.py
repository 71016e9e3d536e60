"""modules/script_callbacks.py (identical in A1111 1.10 and Forge): registration at import."""
from tests.board_standins.common import Callbacks

_callbacks = Callbacks()


def on_ui_tabs(callback, *, name=None):
    _callbacks.add("ui_tabs", callback)


def on_ui_settings(callback, *, name=None):
    _callbacks.add("ui_settings", callback)


def on_before_ui(callback, *, name=None):
    _callbacks.add("before_ui", callback)


def on_model_loaded(callback, *, name=None):
    _callbacks.add("model_loaded", callback)


def on_script_unloaded(callback, *, name=None):
    _callbacks.add("script_unloaded", callback)


def ui_tabs_callback():
    res = []
    for items in _callbacks.call("ui_tabs"):
        res += items or []
    return res


def ui_settings_callback():
    _callbacks.call("ui_settings")


def before_ui_callback():
    _callbacks.call("before_ui")


def model_loaded_callback(sd_model):
    _callbacks.call("model_loaded", sd_model)


def script_unloaded_callback():
    _callbacks.call("script_unloaded")


def clear_callbacks():
    _callbacks.lists.clear()
