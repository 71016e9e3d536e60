"""modules/shared.py: the globals Forge's sampler loop reads."""
import types

opts = types.SimpleNamespace(skip_early_cond=0.0, s_min_uncond_all=False, hide_samplers=[], eta_ancestral=1.0, eta_ddim=0.0)
state = types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
sd_model = None
