# Follows modules/script_callbacks.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/script_callbacks.py, alike in A1111 v1.10.1 and Forge: the registrations both features
use, and their dispatch (a failing callback is reported and the rest still run)."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {
    "callbacks_ui_tabs": [], "callbacks_ui_settings": [], "callbacks_before_ui": [], "callbacks_model_loaded": [],
    "callbacks_script_unloaded": [], "callbacks_cfg_denoiser": [],
}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    callbacks.append(ScriptCallback(filename or "standin", fun, name or category))


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        for c in list(callbacks):
            if c.callback == callback_func:
                callbacks.remove(c)


def _run(category, *args):
    results = []
    for c in callback_map[f"callbacks_{category}"]:
        try:
            results.append(c.callback(*args))
        except Exception as err:  # report_exception: the real one prints and carries on
            print(f"Error executing callback {category}_callback for {c.script}: {err}")
    return results


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def ui_tabs_callback():
    res = []
    for tabs in _run("ui_tabs"):
        res += tabs or []
    return res


def ui_settings_callback():
    _run("ui_settings")


def before_ui_callback():
    _run("before_ui")


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def script_unloaded_callback():
    _run("script_unloaded")
