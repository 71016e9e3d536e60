# Follows modules/sd_samplers.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/sd_samplers.py (v1.10.1): all_samplers (k-diffusion, then timesteps); the rest is shared
with Forge (../../shared_src/sd_samplers.py). No add_sampler (that is Forge's)."""
from modules import sd_samplers_kdiffusion, sd_samplers_timesteps
from tests.hosts.common import exec_shared

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
exec_shared("sd_samplers", globals())
