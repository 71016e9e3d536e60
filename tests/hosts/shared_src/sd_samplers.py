# Follows modules/sd_samplers.py of A1111 v1.10.1 and Forge dfdcbab685e5, alike (run in each host's module).
"""modules/sd_samplers.py below ``all_samplers``, alike in A1111 v1.10.1 and Forge: the name map,
find_sampler_config, create_sampler, set_samplers, visible_sampler_names and the functools.cache'd
get_sampler_and_scheduler. Each host's sd_samplers.py sets ``all_samplers`` and runs this."""
# ruff: noqa: F821  (all_samplers is set by the host module before it runs this)
import functools

from modules import shared

all_samplers_map = {x.name: x for x in all_samplers}
samplers = []
samplers_for_img2img = []
samplers_map = {}
samplers_hidden = {}


def find_sampler_config(name):
    return all_samplers_map.get(name, None) if name is not None else all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def set_samplers():
    global samplers, samplers_for_img2img, samplers_hidden
    samplers_hidden = set(shared.opts.hide_samplers)
    samplers = all_samplers
    samplers_for_img2img = all_samplers
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]


@functools.cache
def get_sampler_and_scheduler(sampler_name, scheduler_name, *, convert_automatic=True):
    sampler = all_samplers_map.get(sampler_name or samplers[0].name, samplers[0])
    return sampler.name, "Automatic"


set_samplers()
