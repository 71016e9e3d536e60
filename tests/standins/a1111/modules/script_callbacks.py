"""modules/script_callbacks.py: the registration calls we use (on_before_ui) and its dispatch."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_before_ui": [], "callbacks_cfg_denoiser": [], "callbacks_script_unloaded": []}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    callbacks.append(ScriptCallback(filename or "standin", fun, name or category))


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def before_ui_callback():
    for c in callback_map["callbacks_before_ui"]:
        try:
            c.callback()
        except Exception as err:  # the real one reports and carries on
            print(f"before_ui callback error: {err}")


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        for c in list(callbacks):
            if c.callback == callback_func:
                callbacks.remove(c)
