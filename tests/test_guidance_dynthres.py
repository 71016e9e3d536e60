import math

import pytest
import torch

from lib_merge.errors import BadParameterError
from lib_merge.guidance import (
    DynThresholdConfig,
    GuidanceSettings,
    dynamic_threshold,
    schedule_scale,
)
from lib_merge.guidance.settings import DYNTHRES_SCHEDULES


def _map(*values):
    """A (1, 1, 2, 2) latent from four numbers."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2)


def _cfg(**kw):
    return DynThresholdConfig(**kw)


# T_w = 1 + 10Δ and T_m = 1 + 2Δ with Δ = [1, -1, 3, -3]: both have mean 1.
T_W = _map(11, -9, 31, -29)
T_M = _map(3, -1, 7, -5)


def test_mean_ad_full_percentile_shrinks_deviations_to_the_mimic_max():
    # R_m = 6, R_w = 30, M = 30: deviations scaled by 6/30 around the mean 1.
    out = dynamic_threshold(T_W, T_M, _cfg())
    assert torch.allclose(out, _map(3, -1, 7, -5))


def test_mean_ad_percentile_clamps_before_rescaling():
    # |C_w| = [10, 10, 30, 30]; 50th percentile (linear) = 20; M = max(6, 20) = 20;
    # clamp to ±20 -> [10, -10, 20, -20]; scale 6/20 -> [3, -3, 6, -6]; + mean 1.
    out = dynamic_threshold(T_W, T_M, _cfg(threshold_percentile=50.0))
    assert torch.allclose(out, _map(4, -2, 7, -5))


def test_mean_ad_is_a_no_op_when_the_cfg_result_is_narrower_than_the_mimic():
    out = dynamic_threshold(T_M, T_W, _cfg())
    assert torch.allclose(out, T_M)


def test_zero_startpoint_scales_without_recentring():
    # res = T_w * R_m / R_w = T_w * 6 / 30.
    out = dynamic_threshold(T_W, T_M, _cfg(scaling_startpoint="ZERO"))
    assert torch.allclose(out, _map(2.2, -1.8, 6.2, -5.8))


def test_std_measure_differs_from_ad():
    t_w, t_m = _map(4, -4, 1, -1), _map(0, 0, 2, -2)  # both mean 0
    ratio = math.sqrt(8 / 34)  # std(C_m)/std(C_w): unbiased stds sqrt(8/3), sqrt(34/3)
    std = dynamic_threshold(t_w, t_m, _cfg(variability_measure="STD"))
    assert torch.allclose(std, _map(4 * ratio, -4 * ratio, ratio, -ratio), atol=1e-6)
    ad = dynamic_threshold(t_w, t_m, _cfg())
    assert torch.allclose(ad, _map(2, -2, 0.5, -0.5))  # M = 4, scale 2/4
    zero_std = dynamic_threshold(t_w + 1, t_m + 1, _cfg(variability_measure="STD", scaling_startpoint="ZERO"))
    assert torch.allclose(zero_std, (t_w + 1) * ratio, atol=1e-6)


def test_separate_feature_channels_versus_one_statistic_for_the_batch():
    t_w = torch.stack([_map(4, -4, 1, -1)[0, 0], _map(1, -1, 1, -1)[0, 0]])[None]
    t_m = torch.stack([_map(0, 0, 2, -2)[0, 0], _map(1, -1, 1, -1)[0, 0]])[None]
    sep = dynamic_threshold(t_w, t_m, _cfg(separate_feature_channels=True))
    assert torch.allclose(sep[0, 0], _map(2, -2, 0.5, -0.5)[0, 0])
    assert torch.allclose(sep[0, 1], _map(1, -1, 1, -1)[0, 0])
    joint = dynamic_threshold(t_w, t_m, _cfg(separate_feature_channels=False))
    # One R_m = 2 and one R_w = 4 for the whole tensor: every deviation scaled by 2/4.
    assert torch.allclose(joint, t_w * 0.5)


def test_interpolate_phi_blends_with_the_raw_cfg_result():
    out = dynamic_threshold(T_W, T_M, _cfg(interpolate_phi=0.25))
    assert torch.allclose(out, 0.25 * _map(3, -1, 7, -5) + 0.75 * T_W)


def test_flat_cfg_result_is_left_alone_instead_of_dividing_by_zero():
    flat = _map(2, 2, 2, 2)
    for start in ("MEAN", "ZERO"):
        for measure in ("AD", "STD"):
            out = dynamic_threshold(flat, T_M, _cfg(scaling_startpoint=start, variability_measure=measure))
            assert torch.allclose(out, flat), (start, measure)


def test_half_precision_in_half_precision_out():
    out = dynamic_threshold(T_W.half(), T_M.half(), _cfg(threshold_percentile=95.0))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# Step 3 of 11 -> f = 0.3; scale 10, minimum 2, scheduler value 4 (so f*v = 1.2, portion 0.2).
EXPECTED_AT_F03 = {
    "Constant": 10.0,
    "Linear Down": 2 + 8 * 0.7,
    "Cosine Down": 2 + 8 * math.cos(0.3 * math.pi / 2),
    "Half Cosine Down": 2 + 8 * math.cos(0.3),
    "Linear Up": 2 + 8 * 0.3,
    "Cosine Up": 2 + 8 * (1 - math.cos(0.3 * math.pi / 2)),
    "Half Cosine Up": 2 + 8 * (1 - math.cos(0.3)),
    "Power Up": 2 + 8 * 0.3**4,
    "Power Down": 2 + 8 * (1 - 0.3**4),
    "Linear Repeating": 2 + 8 * 0.6,
    "Cosine Repeating": 2 + 8 * (0.5 + 0.5 * math.cos(2 * math.pi * 1.2)),
    "Sawtooth": 2 + 8 * 0.2,
}


def test_all_twelve_schedules_are_covered():
    assert set(EXPECTED_AT_F03) == set(DYNTHRES_SCHEDULES)


@pytest.mark.parametrize("mode", DYNTHRES_SCHEDULES)
def test_schedule_values(mode):
    assert schedule_scale(mode, 10.0, 2.0, 3, 11, 4.0) == pytest.approx(EXPECTED_AT_F03[mode])


def test_schedule_ends_and_single_step_runs():
    assert schedule_scale("Linear Down", 10.0, 2.0, 10, 11, 4.0) == pytest.approx(2.0)
    assert schedule_scale("Linear Up", 10.0, 2.0, 0, 11, 4.0) == pytest.approx(2.0)
    # The reference divides by steps - 1; a one-step run sits at the start of every schedule.
    assert schedule_scale("Linear Down", 10.0, 2.0, 0, 1, 4.0) == pytest.approx(10.0)
    assert schedule_scale("Linear Up", 10.0, 2.0, 0, 1, 4.0) == pytest.approx(2.0)


def test_config_from_settings_and_scheduled_scales():
    s = GuidanceSettings(
        dynthres_enabled=True, dynthres_mimic_scale=4.0, dynthres_mimic_mode="Linear Down", dynthres_mimic_scale_min=1.0,
        dynthres_cfg_mode="Linear Up", dynthres_cfg_scale_min=3.0,
    )
    config = DynThresholdConfig.from_settings(s)
    assert config.mimic_mode == "Linear Down" and config.threshold_percentile == 100.0
    w, m = config.scales(9.0, 5, 11)
    assert w == pytest.approx(3 + 6 * 0.5) and m == pytest.approx(1 + 3 * 0.5)


def test_bad_options_raise_typed_errors():
    with pytest.raises(BadParameterError):
        DynThresholdConfig(cfg_mode="Linear Sideways")
    with pytest.raises(BadParameterError):
        DynThresholdConfig(threshold_percentile=120.0)
    with pytest.raises(BadParameterError):
        schedule_scale("Wobble", 7.0, 0.0, 0, 10, 4.0)
