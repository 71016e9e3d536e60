"""modules/shared.py: the globals the sampler loop reads."""
import types

opts = types.SimpleNamespace(
    batch_cond_uncond=True, skip_early_cond=0.0, s_min_uncond_all=False, pad_cond_uncond=False,
    pad_cond_uncond_v0=False, hide_samplers=[], eta_ancestral=1.0, eta_ddim=0.0, enable_quantization=False,
    live_preview_content="Prompt",
)
state = types.SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
sd_model = None
device = "cpu"
