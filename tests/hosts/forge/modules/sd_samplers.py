# Follows modules/sd_samplers.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/sd_samplers.py (Forge): all_samplers (k-diffusion only here), the part shared with A1111
(../../shared_src/sd_samplers.py), plus ``add_sampler`` (rebinds all_samplers_map)."""
from modules import sd_samplers_kdiffusion
from tests.hosts.common import exec_shared

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion]
exec_shared("sd_samplers", globals())


def add_sampler(sampler):
    global all_samplers, all_samplers_map
    if sampler.name not in [x.name for x in all_samplers]:
        all_samplers.append(sampler)
        all_samplers_map = {x.name: x for x in all_samplers}
        set_samplers()  # noqa: F821  (shared part)
