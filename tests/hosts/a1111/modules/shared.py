# Follows modules/shared.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/shared.py: one source with Forge's in ../../shared_src, plus the options A1111's sampler loop reads."""
from tests.hosts.common import exec_shared

HOST_OPTS = dict(
    batch_cond_uncond=True, skip_early_cond=0.0, s_min_uncond_all=False, pad_cond_uncond=False,
    pad_cond_uncond_v0=False, hide_samplers=[], eta_ancestral=1.0, eta_ddim=0.0, enable_quantization=False,
    live_preview_content="Prompt",
)
exec_shared("shared", globals())
