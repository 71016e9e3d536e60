# Follows modules/scripts.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/scripts.py, alike in A1111 v1.10.1 and Forge: Script, AlwaysVisible, scripts_data and the
runner calls a generation makes. As in the real runner every script call is wrapped: an exception
is reported and swallowed, and the generation goes on."""
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

    def ui(self, is_img2img):
        return []

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        return f"script_{tab}_{self.title().lower().replace(' ', '_')}_{item_id}"

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.inputs = []

    def initialize(self):
        """initialize_scripts + setup_ui for txt2img: an instance of every listed script; the
        always-visible ones run on every generation, each with its UI's slice of script_args."""
        self.scripts, self.alwayson_scripts, self.inputs = [], [], []
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            if script.show(False) is AlwaysVisible:
                self.add(script, len(script.ui(False) or []))
            else:
                self.scripts.append(script)

    def add(self, script, n_args):
        script.args_from = len(self.inputs)
        self.inputs += [None] * n_args
        script.args_to = len(self.inputs)
        script.alwayson = True
        self.scripts.append(script)
        self.alwayson_scripts.append(script)

    def _each(self, method, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, method)(p, *args, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {method}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)

    def before_hr(self, p):
        pass


scripts_txt2img = ScriptRunner()
