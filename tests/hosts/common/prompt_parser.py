# Follows modules/prompt_parser.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike in these parts.
"""modules/prompt_parser.py (A1111 v1.10.1; Forge's is the same in these parts): the conditioning
structures, AND sub-prompts with weights, and batch reconstruction. Prompt-editing syntax
([a:b:n]) is not needed by our tests, so every prompt has one schedule."""
from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None, distilled_cfg_scale=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    for prompt in prompts:
        if prompt in cache:  # the real function reuses the same schedule list for repeated prompts
            res.append(cache[prompt])
            continue
        conds = model.get_learned_conditioning(SdConditioning([prompt], copy_from=prompts))
        cond = {k: v[0] for k, v in conds.items()} if isinstance(conds, dict) else conds[0]
        cache[prompt] = [ScheduledPromptConditioning(steps, cond)]
        res.append(cache[prompt])
    return res


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_indexes = [], {}
    flat = SdConditioning(prompts)
    flat.clear()
    for prompt in prompts:
        indexes = []
        for sub in re_AND.split(prompt):
            text, weight = re_weight.search(sub).groups()
            weight = float(weight) if weight is not None else 1.0
            if text not in prompt_indexes:
                prompt_indexes[text] = len(flat)
                flat.append(text)
            indexes.append((prompt_indexes[text], weight))
        res_indexes.append(indexes)
    return res_indexes, flat, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in idx] for idx in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry
    return schedules[0]


def reconstruct_cond_batch(c, current_step):
    conds = [_pick(s, current_step).cond for s in c]
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.stack([x[k] for x in conds]) for k in conds[0]})
    return torch.stack(conds)


def stack_conds(tensors):
    tokens = max(t.shape[0] for t in tensors)
    padded = [t if t.shape[0] == tokens else torch.vstack([t, t[-1:].repeat(tokens - t.shape[0], 1)]) for t in tensors]
    return torch.stack(padded)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composables in c.batch:
        entry = []
        for composable in composables:
            entry.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step).cond)
        conds_list.append(entry)
    if isinstance(tensors[0], dict):
        stacked = DictWithShape({k: stack_conds([x[k] for x in tensors]) for k in tensors[0]})
        return conds_list, stacked
    return conds_list, stack_conds(tensors)
