"""modules/sd_samplers.py (v1.10.1): all_samplers, all_samplers_map, set_samplers, create_sampler and
the functools.cache'd get_sampler_and_scheduler. No add_sampler (that is Forge's)."""
import functools

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps, shared

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
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
