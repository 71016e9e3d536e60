# Follows modules/shared.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/shared.py: one source with A1111's in ../../shared_src, plus the options Forge's sampler loop reads."""
from tests.hosts.common import exec_shared

HOST_OPTS = dict(skip_early_cond=0.0, s_min_uncond_all=False, hide_samplers=[], eta_ancestral=1.0, eta_ddim=0.0)
exec_shared("shared", globals())
