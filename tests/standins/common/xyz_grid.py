"""scripts/xyz_grid.py (v1.10.1): AxisOption, its helpers, the module global ``axis_options``, and a
cell runner that does what ``Script.run``'s ``cell()`` does: a shallow copy of ``p`` per cell."""
from copy import copy

from modules import processing


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.prepare, self.choices = confirm, cost, prepare, choices


axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("CFG Scale", float, apply_field("cfg_scale"))]


def run_axis(p, opt, values_text):
    """Parse one axis like ``process_axis`` (comma list, then ``opt.type``), confirm, run each cell."""
    xs = [opt.type(v.strip()) for v in values_text.split(",")]
    if opt.confirm:
        opt.confirm(p, xs)
    results = []
    for x in xs:
        pc = copy(p)
        opt.apply(pc, x, xs)
        results.append((pc, processing.process_images(pc), opt.format_value(pc, opt, x)))
    return results


from modules import scripts  # noqa: E402


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"
