"""Untitled Guidance: sample with no prompt, and CFG++, PAG, SEG, FreeU, CFG rescale, dynamic
thresholding, the alternative combiners (APG, CFG-Zero*, TCFG, MaHiRo, Skimmed CFG, FDG), NAG and
the CFG interval, on A1111 1.10 and Forge. An always-visible script; this file only wires the WebUI
to ``lib_merge.webui.guidance`` (the controls in ``controls`` and ``ui``, API args in ``args``,
infotext in ``infotext`` and ``paste``, the sampling hooks in the ``a1111`` / ``forge`` adapters,
X/Y/Z axes in ``xyz``).

API: ``"alwayson_scripts": {"untitled guidance": {"args": [{"untitled": "empty", "pag_scale": 3}]}}``
(one dict by name) or the positional list in the UI's order. Unknown names or bad values fail the
request with a message naming them, before the prompts are encoded (``guidance_args.fail_before_sampling``).
"""
import gradio as gr

from modules import script_callbacks, scripts

from lib_merge.errors import BadParameterError
from lib_merge.webui.guidance import args as guidance_args
from lib_merge.webui.guidance import console as guidance_log
from lib_merge.webui.guidance import controls as guidance_controls
from lib_merge.webui.guidance import host_adapter
from lib_merge.webui.guidance import infotext as guidance_infotext
from lib_merge.webui.guidance import paste as guidance_paste
from lib_merge.webui.guidance import ui as guidance_ui
from lib_merge.webui.guidance import xyz as xyz_guidance
from lib_merge.webui.hosts import xyz

adapter = host_adapter()
# At import: the sampler dropdowns are built from the host's list when the UI is made.
adapter.register_samplers()

_STATE_ATTR = "_untitled_guidance_state"


def resolve(p, args):
    """(settings, error) for this processing object: UI/API args, then X/Y/Z overrides on ``p``."""
    try:
        controls = guidance_args.controls_from_args(args)
        controls = xyz_guidance.apply_p_overrides(controls, p)
        return guidance_controls.settings_from_controls(controls), None
    except BadParameterError as err:
        return guidance_controls.settings_from_controls({}), err


class UntitledGuidanceScript(scripts.Script):
    sorting_priority = 16  # Forge orders always-visible scripts by this; A1111 ignores it

    def title(self):
        return guidance_log.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        extras = {}
        components = guidance_ui.build_ui(gr, self.elem_id, extras)
        guidance_ui.connect_conflict_message(components, extras["conflict"])
        self.paste_cache = guidance_paste.PasteCache()
        self.infotext_fields = guidance_ui.infotext_fields(components, self.paste_cache)
        self.paste_field_names = guidance_ui.send_to_names()
        return components

    def process(self, p, *args):
        # Runs once per process_images call, i.e. per X/Y/Z cell on that cell's copy of p.
        adapter.new_generation()
        settings, error = resolve(p, args)
        setattr(p, _STATE_ATTR, (settings, error))
        if error is not None:
            guidance_infotext.write_infotext(p.extra_generation_params, guidance_controls.settings_from_controls({}))
            print(f"[{guidance_log.TITLE}] {error}")
            guidance_args.fail_before_sampling(p, error)
            return
        guidance_infotext.write_infotext(p.extra_generation_params, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        state = getattr(p, _STATE_ATTR, None)
        settings, error = state if state is not None else resolve(p, args)
        try:
            adapter.prepare_sampling(p, settings, error=error)
        except Exception as err:  # never fail an image over guidance; the error says what was skipped
            print(f"[{guidance_log.TITLE}] guidance skipped for this pass: {type(err).__name__}: {err}")

    def postprocess_batch(self, p, *args, **kwargs):
        adapter.finish(p)


def on_before_ui():
    xyz.register_axes(xyz_guidance.AXES)


script_callbacks.on_before_ui(on_before_ui)
