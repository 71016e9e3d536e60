"""The Merge Board: a gradio tab built against the ``Host`` protocol (works on gradio 3.41 and 4.x).

Model pickers A–F (B… filtered to A's architecture), method with parameter controls generated from
the method registry, 26 (SD1/SD2) or 20 (SDXL) block sliders, presets, a weight string kept in
sync with the sliders (instantly in ``javascript/merge_board.js``, and server-side on slider
release / string submit so it works without JS), a block-weight curve, an A-vs-B difference
heatmap, the live-preview switch and a Preview button (hosts with a sampler), Save with progress
and cancel (fp8 dtypes, LoRAs from the host's LoRA folder baked in), Extract LoRA (B − A into the
LoRA folder), and "load recipe" from any merged file.

The handlers are plain methods of ``Board`` (testable without a browser); ``build()`` only lays
out components and wires events. Only ``gr.update`` is used, ``_js``/``js`` are chosen by the
gradio major version, no ``.style()``.

This module is the layout and the wiring. ``Board`` is assembled from ``base`` (checkpoints
and the recipe), ``sync`` (controls kept in step) and ``actions`` (live session,
preview, compare, save, load recipe); the figures are in ``plots`` and the gradio-version
shims in ``gradio_compat``. (A VAE to bake travels in the recipe; the engine bakes it.)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ...arch.spec import get_arch
from ...blocks import format_block_weights, parse_block_weights, preset_names
from .actions import ActionHandlers
from .base import ALL_BLOCKS, LETTERS, NO_VAE
from .gradio_compat import _gr, _html_message, _js_kwargs
from .sync import CUSTOM, WEIGHT_MAX, WEIGHT_MIN, SyncHandlers
from .host import Host
from .live_session import LiveSession
from .loras import LIVE_AND_SAVE, LoraHandlers

ELEM = "mergeboard"
DTYPES = ("fp16", "bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2")  # fp8: the U-Net; text encoders and VAE fp16
ALPHA_NOTE = (
    "**α is B's share**: 0 keeps model A, 1 gives model B (per block with the sliders). "
    "Block weights follow the supermerger layout: BASE = text encoders and VAE, IN/M/OUT = U-Net blocks."
)


class Board(SyncHandlers, ActionHandlers, LoraHandlers):
    """State-free handlers of the board (the live state is the ``LiveSession``)."""


# -- layout and wiring -------------------------------------------------------------------------------
def build(host: Host, session: Optional[LiveSession] = None, *, standalone: bool = False):
    """Create the board's components inside the current gradio context (or a new ``gr.Blocks``)
    and wire every event. Returns the Blocks and the ``Board`` (for hooks and tests)."""
    gr = _gr()
    board = Board(host, session)
    method = board.methods.get("weighted_sum") or next(iter(board.methods.values()))
    a_title = board.default_a()
    arch = board.arch_name(a_title)
    a_choices, b_choices = board.choices_for(a_title)
    settings = host.settings()
    values = parse_block_weights(None, arch, base=0.5)

    blocks_ctx = gr.Blocks(analytics_enabled=False, title="Merge Board") if standalone else gr.Blocks(analytics_enabled=False)
    with blocks_ctx as ui:
        with gr.Column(elem_id=f"{ELEM}_root"):
            notes = [ALPHA_NOTE] + [f"*{n}*" for n in host.notes()]
            gr.Markdown("\n\n".join(notes), elem_id=f"{ELEM}_notes")
            with gr.Row():
                pickers = []
                for i, letter in enumerate(LETTERS):
                    pickers.append(gr.Dropdown(
                        choices=a_choices if i == 0 else b_choices, value=a_title if i == 0 else None,
                        label=f"Model {letter}" + (" (loaded model for live preview)" if i == 0 and host.has_sampler else ""),
                        elem_id=f"{ELEM}_model_{letter}", visible=i < 2, interactive=True, allow_custom_value=i > 0,
                    ))
                # a text label: an emoji renders as an empty box where no emoji font is installed
                refresh = gr.Button("Refresh", elem_id=f"{ELEM}_refresh", scale=0, min_width=80)
            with gr.Row():
                method_dd = gr.Dropdown(choices=list(board.methods), value=method.name, label="Method", elem_id=f"{ELEM}_method")
                seed = gr.Number(value=0, precision=0, label="Seed (random methods, noise inputs)", elem_id=f"{ELEM}_seed")
                arch_html = gr.HTML(board._arch_html(arch, a_title)["value"], elem_id=f"{ELEM}_arch")
            method_help = gr.Markdown(board.method_help(method), elem_id=f"{ELEM}_method_help")
            with gr.Row():
                alpha = gr.Slider(minimum=WEIGHT_MIN, maximum=WEIGHT_MAX, step=0.01, value=0.5, label=Board._alpha_label(method),
                                  elem_id=f"{ELEM}_alpha")
                beta = gr.Slider(minimum=WEIGHT_MIN, maximum=WEIGHT_MAX, step=0.01, value=0.5, label="β", elem_id=f"{ELEM}_beta",
                                 visible=False)
            param_controls = []
            with gr.Row():
                for name, spec in board.param_specs.items():
                    kw = dict(label=name, elem_id=f"{ELEM}_param_{name}", visible=False,
                              info=f"{spec.help} ({spec.describe_range()})")
                    if spec.kind is bool:
                        control = gr.Checkbox(value=bool(spec.default), **kw)
                    elif spec.choices is not None:
                        control = gr.Dropdown(choices=list(spec.choices), value=spec.default, **kw)
                    elif spec.kind in (int, float):
                        control = gr.Number(value=spec.default, precision=0 if spec.kind is int else None, **kw)
                    else:
                        control = gr.Textbox(value=str(spec.default), lines=1, **kw)
                    param_controls.append(control)
            with gr.Column(elem_id=f"{ELEM}_blocks") as block_area:
                with gr.Row():
                    preset = gr.Dropdown(choices=[CUSTOM] + preset_names(arch), value=board.preset_label(arch, values),
                                         label="Preset", elem_id=f"{ELEM}_preset")
                    with gr.Column(scale=4):
                        weights = gr.Textbox(value=format_block_weights(values, arch), lines=1, max_lines=2,
                                             label="Block weights (α per block; presets and IN04=0.3 overrides work; Enter applies)",
                                             elem_id=f"{ELEM}_weights")
                        weights_msg = gr.HTML("", elem_id=f"{ELEM}_weights_msg")
                sliders: dict[str, Any] = {}
                visible_blocks = get_arch(arch).blocks
                with gr.Row():
                    sliders["BASE"] = gr.Slider(WEIGHT_MIN, WEIGHT_MAX, step=0.01, value=0.5, label="BASE", elem_id=f"{ELEM}_w_BASE")
                    sliders["M00"] = gr.Slider(WEIGHT_MIN, WEIGHT_MAX, step=0.01, value=0.5, label="M00", elem_id=f"{ELEM}_w_M00")
                with gr.Row():
                    with gr.Column():
                        for i in range(12):
                            name = f"IN{i:02d}"
                            sliders[name] = gr.Slider(WEIGHT_MIN, WEIGHT_MAX, step=0.01, value=0.5, label=name,
                                                      elem_id=f"{ELEM}_w_{name}", visible=name in visible_blocks)
                    with gr.Column():
                        for i in range(11, -1, -1):
                            name = f"OUT{i:02d}"
                            sliders[name] = gr.Slider(WEIGHT_MIN, WEIGHT_MAX, step=0.01, value=0.5, label=name,
                                                      elem_id=f"{ELEM}_w_{name}", visible=name in visible_blocks)
                ordered_sliders = [sliders[n] for n in ALL_BLOCKS]
                curve = gr.Plot(value=board.curve(arch, values), label="Block-weight curve", elem_id=f"{ELEM}_curve")
            with gr.Row():
                compare = gr.Button("Compare A and B (per-block difference)", elem_id=f"{ELEM}_compare")
            diff_plot = gr.Plot(label="A vs B per block", elem_id=f"{ELEM}_heatmap")
            # a host that draws its own previews (the standalone toy host) re-renders on every change
            live_images = bool(getattr(host, "live_images", False))
            with gr.Group(visible=host.has_sampler, elem_id=f"{ELEM}_preview_group"):
                live = gr.Checkbox(value=False, label="Live preview: the image follows every change (A is restored when off)"
                                   if live_images else "Live preview: txt2img generations use this merge (restored when off)",
                                   elem_id=f"{ELEM}_live")
                with gr.Row():
                    with gr.Column():
                        p_prompt = gr.Textbox(label="Prompt (empty = untitled)", lines=2, elem_id=f"{ELEM}_prompt")
                        p_negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{ELEM}_negative")
                        with gr.Row():
                            # a live image keeps its seed while sliders move, so the change shown is the merge's
                            p_seed = gr.Number(value=0 if live_images else -1, precision=0, label="Seed", elem_id=f"{ELEM}_pseed")
                            p_steps = gr.Number(value=20, precision=0, label="Steps", elem_id=f"{ELEM}_steps")
                            p_cfg = gr.Number(value=5.0 if live_images else 7.0, label="CFG", elem_id=f"{ELEM}_cfg")
                        with gr.Row(visible=not live_images):  # toy models draw at their own size
                            p_width = gr.Number(value=512 if arch != "sdxl" else 1024, precision=0, label="Width", elem_id=f"{ELEM}_width")
                            p_height = gr.Number(value=512 if arch != "sdxl" else 1024, precision=0, label="Height", elem_id=f"{ELEM}_height")
                        p_sampler, p_options = None, []
                        if live_images:
                            with gr.Row():
                                p_sampler = gr.Dropdown(choices=list(host.samplers), value=host.samplers[0], label="Sampler",
                                                        elem_id=f"{ELEM}_sampler")
                                for name, label, default, top in host.options:
                                    p_options.append(gr.Slider(0.0, top, step=0.05, value=default, label=label,
                                                               elem_id=f"{ELEM}_opt_{name}"))
                        preview_btn = gr.Button("Preview", variant="primary", elem_id=f"{ELEM}_preview")
                    with gr.Column():
                        p_image = gr.Image(type="pil", interactive=False, label="Preview", elem_id=f"{ELEM}_image", height=384)
                        p_info = gr.Textbox(label="Infotext", lines=3, interactive=False, elem_id=f"{ELEM}_infotext")
            with gr.Accordion("Save", open=True, elem_id=f"{ELEM}_save_box"):
                with gr.Row():
                    save_name = gr.Textbox(label=f"File name (saved in {settings.output_dir})", lines=1, elem_id=f"{ELEM}_save_name")
                    save_dtype = gr.Dropdown(choices=list(DTYPES), value=settings.dtype, label="dtype", elem_id=f"{ELEM}_dtype")
                    save_vae = gr.Dropdown(choices=[NO_VAE] + [v.title for v in host.vaes()], value=NO_VAE, label="Bake VAE",
                                           elem_id=f"{ELEM}_vae")
                    overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id=f"{ELEM}_overwrite")
                gr.Markdown(f"*LoRAs from {settings.lora_dir or 'the LoRA folder'}. {LIVE_AND_SAVE}*", elem_id=f"{ELEM}_lora_note")
                with gr.Row():
                    lora_pick = gr.Dropdown(choices=board.lora_titles(), value=None, label="LoRA", elem_id=f"{ELEM}_lora")
                    lora_strength = gr.Number(value=1.0, label="Strength", elem_id=f"{ELEM}_lora_strength")
                    lora_weights = gr.Textbox(label="Block weights (lbw:INS, 17/12 LBW values, or IN04=0; empty = all 1)",
                                              lines=1, elem_id=f"{ELEM}_lora_weights")
                    lora_add = gr.Button("Add LoRA", elem_id=f"{ELEM}_lora_add", scale=0, min_width=100)
                lora_list = gr.Textbox(label="LoRAs, in the live preview and on Save (one per line: NAME | STRENGTH | BLOCK WEIGHTS)", lines=2,
                                       elem_id=f"{ELEM}_lora_list")
                with gr.Row():
                    save_btn = gr.Button("Save", variant="primary", elem_id=f"{ELEM}_save")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id=f"{ELEM}_cancel")
                save_result = gr.HTML(elem_id=f"{ELEM}_save_result")
            with gr.Accordion("Extract LoRA (B − A)", open=False, elem_id=f"{ELEM}_extract_box"):
                with gr.Row():
                    extract_name = gr.Textbox(label=f"LoRA file name (saved in {settings.lora_dir})", lines=1,
                                              elem_id=f"{ELEM}_extract_name")
                    extract_rank = gr.Number(value=64, precision=0, label="Rank", elem_id=f"{ELEM}_extract_rank")
                    extract_overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id=f"{ELEM}_extract_overwrite")
                    extract_btn = gr.Button("Extract LoRA", elem_id=f"{ELEM}_extract")
                extract_result = gr.HTML(elem_id=f"{ELEM}_extract_result")
            with gr.Accordion("Load a recipe from a merged file", open=False, elem_id=f"{ELEM}_recipe_box"):
                with gr.Row():
                    recipe_src = gr.Dropdown(choices=a_choices, value=None, label="Merged model", elem_id=f"{ELEM}_recipe_src")
                    load_btn = gr.Button("Load recipe", elem_id=f"{ELEM}_load_recipe")
                recipe_msg = gr.HTML("", elem_id=f"{ELEM}_recipe_msg")
            status = gr.HTML(_html_message(board.session.status_line()), elem_id=f"{ELEM}_status")

        # the LoRA list last: BoardBase.parse_ui reads it after the parameters, so the recipe carries it
        recipe_inputs = pickers + [method_dd, alpha, beta, weights, seed] + param_controls + [lora_list]
        others = pickers[1:]
        # every event that changes the blocks returns this whole area (Board.block_state)
        block_outputs = ordered_sliders + [weights, curve, preset, weights_msg]
        list_outputs = pickers + [recipe_src, save_vae]

        # Values that depend on the running server (the loaded model, the checkpoint list, the live
        # switch) or on another control: the hosts' ui-config.json must not store them and put a
        # stale one back over the page at the next start (modules/ui_loadsave.py reads this flag).
        for component in (pickers + [method_dd, alpha, beta, preset, weights, live, p_width, p_height, save_vae,
                                     recipe_src, overwrite, lora_pick, lora_list, extract_overwrite]
                          + param_controls + ordered_sliders):
            component.do_not_save_to_config = True

        ui.load(board.on_page_load, [pickers[0]] + others,
                list_outputs + [live, status], show_progress="hidden")
        refresh.click(board.on_refresh, [pickers[0]] + others, list_outputs, show_progress="hidden")
        for event in (ui.load, refresh.click):
            event(board.on_lora_refresh, [lora_pick], [lora_pick], show_progress="hidden")
        lora_add.click(board.on_lora_add, [lora_pick, lora_strength, lora_weights, lora_list], [lora_list, save_result],
                       show_progress="hidden")
        def model_a_fn(a_title, text, alpha_value, width, height, *other_titles):
            return board.on_model_a(a_title, text, alpha_value, *other_titles) + board.preview_size(a_title, width, height)

        pickers[0].change(model_a_fn, [pickers[0], weights, alpha, p_width, p_height] + others,
                          others + block_outputs + [arch_html, p_width, p_height], show_progress="hidden")
        method_outputs = others + [alpha, beta, block_area] + param_controls + [method_help]
        # .change also follows a loaded recipe (visibility only); a method the user picks resets the parameters
        method_dd.change(board.on_method_view, [method_dd], method_outputs, show_progress="hidden")
        method_dd.input(board.on_method, [method_dd], method_outputs, show_progress="hidden")
        # .input: the user's pick only — the label "custom" set by block_state must not re-apply anything
        preset.input(board.on_preset, [preset, pickers[0]], block_outputs, show_progress="hidden")
        alpha.release(board.on_alpha, [alpha, pickers[0]], block_outputs, show_progress="hidden")
        for name, slider in sliders.items():
            slider.release(_bind(board.on_slider, name), [slider, weights, pickers[0], alpha], block_outputs,
                           show_progress="hidden")
        for event in (weights.submit, weights.blur):
            event(board.on_weights_text, [weights, pickers[0], alpha], block_outputs, show_progress="hidden")
        for control in recipe_inputs:
            control.change(board.on_change, recipe_inputs, [status], show_progress="hidden")
        live.change(board.on_live, [live] + recipe_inputs, [status], show_progress="hidden")
        preview_inputs = [p_prompt, p_negative, p_seed, p_steps, p_width, p_height, p_cfg] + recipe_inputs
        if not live_images:
            preview_btn.click(board.on_preview, preview_inputs, [p_image, p_info, status])
        else:
            option_names = [name for name, *_ in host.options]
            extra = [p_sampler] + p_options

            def split_extra(args):
                return args[len(extra):], dict(sampler=args[0], options=dict(zip(option_names, args[1:len(extra)])))

            def preview_fn(*args):
                rest, kw = split_extra(args)
                return board.on_preview(*rest, **kw)

            def live_fn(enabled, *args):
                rest, kw = split_extra(args)
                return board.on_live_image(enabled, *rest, **kw)

            preview_btn.click(preview_fn, extra + preview_inputs, [p_image, p_info, status])
            # every input of the picture: the recipe, the prompt and seed, the sampler and its knobs
            for control in recipe_inputs + [p_seed, p_steps, p_cfg] + extra + [live]:
                control.change(live_fn, [live] + extra + preview_inputs, [p_image, p_info, status], show_progress="hidden")
            for control in (p_prompt, p_negative):  # a typed prompt renders once it is committed
                for event in (control.submit, control.blur):
                    event(live_fn, [live] + extra + preview_inputs, [p_image, p_info, status], show_progress="hidden")

        def compare_fn(a, b, progress=gr.Progress()):
            return board.on_compare(a, b, progress)

        compare.click(compare_fn, [pickers[0], pickers[1]], [diff_plot, status])

        def save_fn(name, dtype, vae, over, loras, *vals, progress=gr.Progress()):
            return board.on_save(name, dtype, vae, over, *vals, progress=progress, loras=loras)

        save_event = save_btn.click(save_fn, [save_name, save_dtype, save_vae, overwrite, lora_list] + recipe_inputs,
                                    [save_result])

        def extract_fn(a, b, rank, name, over, progress=gr.Progress()):
            return board.on_extract(a, b, rank, name, over, progress)

        extract_btn.click(extract_fn, [pickers[0], pickers[1], extract_rank, extract_name, extract_overwrite],
                          [lora_pick, extract_result])
        save_event.then(board.on_refresh, [pickers[0]] + others, list_outputs, show_progress="hidden")
        save_event.then(None, None, None, **_js_kwargs("() => { if (window.mergeboardAfterSave) mergeboardAfterSave(); }"))
        cancel_btn.click(board.on_cancel, None, [save_result], queue=False)
        load_btn.click(board.on_load_recipe, [recipe_src], pickers + [method_dd, alpha, beta, seed, save_dtype]
                       + param_controls + block_outputs + [recipe_msg])
    board.components = dict(
        pickers=pickers, method=method_dd, alpha=alpha, beta=beta, weights=weights, seed=seed, params=param_controls,
        sliders=sliders, preset=preset, curve=curve, diff_plot=diff_plot, live=live, preview=preview_btn,
        image=p_image, infotext=p_info, save_name=save_name, save_dtype=save_dtype, save_vae=save_vae,
        overwrite=overwrite, save=save_btn, cancel=cancel_btn, save_result=save_result, recipe_src=recipe_src,
        load=load_btn, status=status, refresh=refresh, compare=compare, arch=arch_html, weights_msg=weights_msg,
        recipe_msg=recipe_msg, width=p_width, height=p_height, lora=lora_pick, lora_strength=lora_strength,
        lora_weights=lora_weights, lora_add=lora_add, lora_list=lora_list, extract=extract_btn, extract_name=extract_name,
        extract_rank=extract_rank, extract_overwrite=extract_overwrite, extract_result=extract_result,
        prompt=p_prompt, preview_seed=p_seed, sampler=p_sampler, options=p_options,
    )
    return ui, board


def _bind(fn: Callable, first: Any) -> Callable:
    def bound(*args):
        return fn(first, *args)

    bound.__name__ = f"{getattr(fn, '__name__', 'handler')}_{first}"
    return bound
