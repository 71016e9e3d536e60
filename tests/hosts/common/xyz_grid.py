# Follows scripts/xyz_grid.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike in these parts.
"""scripts/xyz_grid.py (v1.10.1; Forge's is the same in these parts): AxisOption, its helpers, the
module global ``axis_options``, and the cell loop of ``draw_xyz_grid``: a shallow copy of ``p`` per
cell, each axis's apply, state.job "<n> out of <total>", process_images, then
SharedSettingsStackHelper's reload_model_weights() after the grid."""
from copy import copy

from modules import processing, scripts, sd_models, shared


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def do_nothing(p, x, xs):
    pass


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.prepare, self.choices = confirm, cost, prepare, choices


axis_options = [AxisOption("Nothing", str, do_nothing), AxisOption("CFG Scale", float, apply_field("cfg_scale"))]


def run_axis(p, opt, values_text):
    """Parse one axis like ``process_axis`` (comma list, then ``opt.type``), confirm, run each cell:
    [(the cell's p, its Processed, its label)]."""
    xs = [opt.type(v.strip()) for v in values_text.split(",")]
    if opt.confirm:
        opt.confirm(p, xs)
    results = []
    for x in xs:
        pc = copy(p)
        opt.apply(pc, x, xs)
        results.append((pc, processing.process_images(pc), opt.format_value(pc, opt, x)))
    return results


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def run_grid(self, p, x_opt, xs, y_opt=None, ys=("",)):
        """Script.run over values already split: [Processed] in cell order."""
        y_opt = y_opt or axis_options[0]
        xs = [x_opt.type(x) for x in xs]
        ys = [y_opt.type(y) for y in ys]
        for opt, values in ((x_opt, xs), (y_opt, ys)):
            if opt.confirm:
                opt.confirm(p, values)
        results = []
        total = len(xs) * len(ys)
        try:
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    shared.state.job = f"{ix + iy * len(xs) + 1} out of {total}"
                    pc = copy(p)
                    x_opt.apply(pc, x, xs)
                    y_opt.apply(pc, y, ys)
                    results.append(processing.process_images(pc))
        finally:
            sd_models.reload_model_weights()  # SharedSettingsStackHelper.__exit__
        return results
