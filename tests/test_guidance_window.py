import pytest

from lib_merge.errors import BadParameterError
from lib_merge.guidance import GuidanceSettings, GuidanceStack, StepWindow
from lib_merge.guidance.settings import TO_THE_END


def test_index_bounds_are_inclusive():
    assert StepWindow(2, 4).steps(10) == [2, 3, 4]
    assert StepWindow(2.0, 4.0).steps(10) == [2, 3, 4]


def test_fraction_bounds_measure_step_over_last_index():
    # 11 steps: progress of step i is i/10.
    assert StepWindow(0.2, 0.5).steps(11) == [2, 3, 4, 5]
    assert StepWindow(0.0, 0.3).steps(11) == [0, 1, 2, 3]


def test_float_one_is_the_whole_run_but_int_one_is_step_one():
    assert StepWindow(0, 1.0).steps(20) == list(range(20))
    assert StepWindow(0, 1).steps(20) == [0, 1]


def test_end_sentinel_and_any_end_past_the_run_mean_to_the_end():
    assert StepWindow(3, TO_THE_END).steps(8) == [3, 4, 5, 6, 7]
    assert StepWindow(3, 8).steps(8) == [3, 4, 5, 6, 7]
    assert StepWindow(0, 150).steps(30) == list(range(30))


def test_start_past_the_run_is_empty_and_one_step_runs_do_not_divide_by_zero():
    assert StepWindow(12, TO_THE_END).steps(10) == []
    assert StepWindow(0.0, 0.5).steps(1) == [0]
    assert StepWindow(0.5, 1.0).steps(1) == []


def test_out_of_range_steps_are_outside():
    assert not StepWindow(0, TO_THE_END).contains(-1, 10)
    assert not StepWindow(0, TO_THE_END).contains(10, 10)


def test_bad_bounds_raise_typed_errors():
    with pytest.raises(BadParameterError):
        StepWindow(-1, 3)
    with pytest.raises(BadParameterError):
        StepWindow(0, float("nan"))


def test_windows_restart_in_the_hires_pass_and_hires_toggle_switches_guiders_off():
    s = GuidanceSettings(pag_scale=3.0, pag_start=1, pag_end=2, seg_scale=2.0, seg_hires=False)
    first = GuidanceStack(s, 10, cfg_scale=7.0)
    hires = GuidanceStack(s, 4, hires=True, cfg_scale=7.0)
    assert [("pag" in first.plan(i).roles) for i in range(4)] == [False, True, True, False]
    assert [("pag" in hires.plan(i).roles) for i in range(4)] == [False, True, True, False]
    assert all("seg" in first.plan(i).roles for i in range(10))
    assert not any("seg" in hires.plan(i).roles for i in range(4))
