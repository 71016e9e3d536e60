"""scripts/xyz_grid.py (A1111 1.10 / Forge): AxisOption, the axis list, and the cell loop of
draw_xyz_grid — a shallow copy of p per cell, each axis's apply, state.job "<n> out of <total>",
process_images, then SharedSettingsStackHelper's reload_model_weights()."""
from copy import copy

from modules import scripts, sd_models, shared
from modules.processing import process_images


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {x}"


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def do_nothing(p, x, xs):
    pass


axis_options = [AxisOption("Nothing", str, do_nothing)]


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def run_grid(self, p, x_opt, xs, y_opt=None, ys=("",)):
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
                    results.append(process_images(pc))
        finally:
            sd_models.reload_model_weights()  # SharedSettingsStackHelper.__exit__
        return results
