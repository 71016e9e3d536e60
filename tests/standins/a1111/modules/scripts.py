"""modules/scripts.py: Script, AlwaysVisible, scripts_data and the runner calls a generation makes.

As in the real runner every script call is wrapped: an exception is reported and swallowed."""
from collections import namedtuple

from modules import errors

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


class Script:
    name = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None
    controls = None

    def title(self):
        raise NotImplementedError()

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        return f"script_{tab}_{self.title().lower().replace(' ', '_')}_{item_id}"

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.inputs = []

    def add(self, script, n_args):
        script.args_from = len(self.inputs)
        self.inputs += [None] * n_args
        script.args_to = len(self.inputs)
        script.alwayson = True
        self.scripts.append(script)
        self.alwayson_scripts.append(script)

    def _each(self, method, p, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, method)(p, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def before_hr(self, p):
        pass
