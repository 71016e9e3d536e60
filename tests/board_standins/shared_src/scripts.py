"""modules/scripts.py: Script, AlwaysVisible, scripts_data and a txt2img runner that calls the
always-on scripts' hooks in the order processing.py does."""
from collections import namedtuple

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


class Script:
    alwayson = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    def __init__(self):
        self.alwayson_scripts = []

    def initialize(self):
        self.alwayson_scripts = []
        for data in scripts_data:
            script = data.script_class()
            if script.show(False) is AlwaysVisible:
                script.alwayson = True
                self.alwayson_scripts.append(script)

    def before_process(self, p):
        pass

    def process(self, p):
        for s in self.alwayson_scripts:
            s.process(p)

    def process_before_every_sampling(self, p, **kwargs):
        for s in self.alwayson_scripts:
            s.process_before_every_sampling(p, **kwargs)

    def postprocess(self, p, processed):
        for s in self.alwayson_scripts:
            s.postprocess(p, processed)


scripts_txt2img = ScriptRunner()
