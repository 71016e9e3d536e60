# Follows backend/sampling/sampling_function.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/sampling/sampling_function.py: conditions -> chunks -> batched forwards -> CFG.

``calc_cond_uncond_batch`` groups every concatenable cond/uncond entry, in the real function's
order (it walks its candidate list reversed, so the uncond chunk usually comes first), as large
as ``memory_required`` allows; calls ``model_function_wrapper`` or ``apply_model``; averages the
cond entries by strength. ``sampling_function_inner`` has the CFG-1 shortcut, pre-CFG, the CFG
function or plain/edit-strength CFG, and the post-CFG list."""
import math

import torch

from backend import memory_management

COND, UNCOND = 0, 1


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=cond))]
    return [dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"], model_conds=dict(c_crossattn=cond["crossattn"], y=cond["vector"]))]


def compile_weighted_conditions(cond, weights):
    results = []
    for cond_pre in map(list, zip(*weights)):
        indices = [i for i, _ in cond_pre]
        weight = cond_pre[-1][1]
        feed = {k: v[indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[indices]
        h = compile_conditions(feed)
        h[0]["strength"] = weight
        results += h
    return results


def _can_concat(a, b):
    if a["input_x"].shape != b["input_x"].shape or (a["control"] is None) != (b["control"] is None):
        return False
    if a["conditioning"].keys() != b["conditioning"].keys():
        return False
    return all(a["conditioning"][k].shape[1:] == b["conditioning"][k].shape[1:] for k in a["conditioning"])


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = []
    for kind, entries in ((COND, cond), (UNCOND, uncond)):
        for x in entries or []:
            strength = x.get("strength", 1.0)
            conditioning = dict(x["model_conds"])
            to_run.append((dict(input_x=x_in, mult=torch.ones_like(x_in) * strength, conditioning=conditioning, control=x.get("control")), kind))
    while to_run:
        first = to_run[0]
        to_batch_temp = [i for i in range(len(to_run)) if _can_concat(to_run[i][0], first[0])]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:1]
        free_memory = memory_management.get_free_memory(x_in.device)
        for i in range(1, len(to_batch_temp) + 1):
            batch_amount = to_batch_temp[: len(to_batch_temp) // i]
            input_shape = [len(batch_amount) * first[0]["input_x"].shape[0]] + list(first[0]["input_x"].shape[1:])
            if model.memory_required(input_shape) < free_memory:
                to_batch = batch_amount
                break
        input_x, mult, c, cond_or_uncond = [], [], [], []
        for x in to_batch:
            o = to_run.pop(x)
            input_x.append(o[0]["input_x"])
            mult.append(o[0]["mult"])
            c.append(o[0]["conditioning"])
            cond_or_uncond.append(o[1])
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = {k: torch.cat([d[k] for d in c]) for k in c[0]}
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = model_options["transformer_options"].copy() if "transformer_options" in model_options else {}
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * mult[o]
                out_count += mult[o]
            else:
                out_uncond += output[o] * mult[o]
                out_uncond_count += mult[o]
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None, return_full=False):
    edit_strength = sum((item["strength"] if "strength" in item else 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and model_options.get("disable_cfg1_optimization", False) == False:  # noqa: E712
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep, "input": x, "sigma": timestep,
                "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    image_cond_in = denoiser_params.image_cond
    if isinstance(image_cond_in, torch.Tensor) and image_cond_in.shape[0] == x.shape[0] and image_cond_in.shape[2:] == x.shape[2:]:
        for entry in (uncond or []) + cond:
            entry["model_conds"]["c_concat"] = image_cond_in
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(model, x, timestep, uncond, cond, cond_scale, model_options, None)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, None, return_full=True)
