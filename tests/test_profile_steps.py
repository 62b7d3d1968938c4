"""IGDS_PROFILE_STEPS / profile_steps: the CUDA profiler window of a real run (issue 15, item 2).

The window opens right before loop step A and closes right after step B-1 of the process's first
batch; here the start/stop functions are replaced by recorders (on CPU the real ones are no-ops,
which the last tests check), so the window's placement is tested without CUDA.
"""
from __future__ import annotations

import pytest
import torch

from factories import tiny_adm, tiny_ve, write_tiny_prior_and_ve
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.guidance import GuidanceConfig
from igds_fast.profiling import window as window_module
from igds_fast.profiling.window import (PROFILE_STEPS_ENV, ProfilerWindow, StepWindow, parse_step_window,
                                        resolve_step_window)
from igds_fast.sampling import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR_MAP = [3, 17, 250, 999]
STEPS = 6


@pytest.fixture(scope="module")
def models():
    return tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)


@pytest.fixture(autouse=True)
def fresh_process_window(monkeypatch):
    """Each test is a fresh process as far as the one-window-per-process rule goes."""
    monkeypatch.setattr(window_module, "_process_window_used", False)
    monkeypatch.delenv(PROFILE_STEPS_ENV, raising=False)


def make(models, **kwargs):
    unet, ve = models
    return Sampler(unet, DiffusionSchedule(ScheduleConfig(sampling_steps=str(STEPS))), ve,
                   GuidanceConfig(scale=1.0, beta=0.5), prior_class_map=PRIOR_MAP, **kwargs)


def recorded_run(sampler, monkeypatch, events, fail_at=None):
    """Sample one batch, recording ("step", k), ("start",) and ("stop",) in order."""
    monkeypatch.setattr(window_module, "profiler_start", lambda device: events.append(("start",)))
    monkeypatch.setattr(window_module, "profiler_stop", lambda device: events.append(("stop",)))
    advance = type(sampler.stepper).advance.__get__(sampler.stepper)  # the step's own, not an earlier wrapper
    k = [0]

    def recording_advance(x, i, batch):
        assert i == STEPS - 1 - k[0]  # loop step k is respaced index N-1-k
        events.append(("step", k[0]))
        if k[0] == fail_at:
            raise RuntimeError("planted failure")
        k[0] += 1
        return advance(x, i, batch)

    monkeypatch.setattr(sampler.stepper, "advance", recording_advance)
    return sampler.sample([0, 1], [5, 6])


@pytest.mark.parametrize("spec, expected", [
    ("2:4", (2, 4)), (" 0:6 ", (0, 6)), (":3", (0, 3)), ("4:", (4, 6)), ((1, 2), (1, 2)),
])
def test_parse_accepts_half_open_windows_of_loop_steps(spec, expected):
    window = parse_step_window(spec, STEPS)
    assert (window.start, window.stop) == expected


@pytest.mark.parametrize("spec, message", [
    ("abc", "must be A:B"), ("3", "must be A:B"), ("1-3", "must be A:B"), ("1:2:3", "must be A:B"),
    (":", "must be A:B"), ("-1:2", "must be A:B"), ("1.5:3", "must be A:B"), ((1, 2, 3), "must be A:B"),
    ("5:3", "5:3 is empty"), ("3:3", "3:3 is empty"),
    ("0:7", "0:7 reaches past the 6 sampling steps"), ("6:", "6:6 is empty"),
])
def test_parse_refuses_bad_windows_in_one_line(spec, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        parse_step_window(spec, STEPS)
    assert "\n" not in str(info.value) and PROFILE_STEPS_ENV in str(info.value)


def test_the_env_var_and_an_explicit_window_must_agree(monkeypatch):
    assert resolve_step_window(None, STEPS) is None
    monkeypatch.setenv(PROFILE_STEPS_ENV, "1:3")
    assert resolve_step_window(None, STEPS) == StepWindow(1, 3)
    assert resolve_step_window("1:3", STEPS, "--profile-steps") == StepWindow(1, 3)
    with pytest.raises(IGDSInputError, match="--profile-steps 2:3 and IGDS_PROFILE_STEPS=1:3 disagree"):
        resolve_step_window("2:3", STEPS, "--profile-steps")


def test_window_opens_before_step_a_and_closes_after_step_b_minus_1(models, monkeypatch):
    monkeypatch.setenv(PROFILE_STEPS_ENV, "2:4")
    sampler = make(models)
    events = []
    recorded_run(sampler, monkeypatch, events)
    assert events == [("step", 0), ("step", 1), ("start",), ("step", 2), ("step", 3), ("stop",),
                      ("step", 4), ("step", 5)]
    events.clear()
    recorded_run(sampler, monkeypatch, events)  # the second batch: no window (one per process)
    assert events == [("step", k) for k in range(STEPS)]
    assert make(models).profile_window == StepWindow(2, 4)  # a new sampler in the same process
    events.clear()
    recorded_run(make(models), monkeypatch, events)
    assert ("start",) not in events


def test_window_over_the_whole_loop_and_the_api_argument(models, monkeypatch):
    sampler = make(models, profile_steps=(0, STEPS))
    events = []
    recorded_run(sampler, monkeypatch, events)
    assert events == [("start",)] + [("step", k) for k in range(STEPS)] + [("stop",)]


def test_an_error_inside_the_window_still_stops_the_profiler(models, monkeypatch):
    sampler = make(models, profile_steps="1:5")
    events = []
    with pytest.raises(RuntimeError, match="planted failure"):
        recorded_run(sampler, monkeypatch, events, fail_at=3)
    assert events == [("step", 0), ("start",), ("step", 1), ("step", 2), ("step", 3), ("stop",)]


def test_no_window_without_the_setting(models, monkeypatch):
    events = []
    recorded_run(make(models), monkeypatch, events)
    assert events == [("step", k) for k in range(STEPS)]


def test_a_bad_env_var_fails_when_the_sampler_is_built(models, monkeypatch):
    monkeypatch.setenv(PROFILE_STEPS_ENV, "3:9")
    with pytest.raises(IGDSInputError, match="IGDS_PROFILE_STEPS 3:9 reaches past the 6 sampling steps"):
        make(models)


def test_start_and_stop_are_no_ops_without_cuda(models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA profiler was called on a CPU run")

    monkeypatch.setattr(torch.cuda.profiler, "start", refuse)
    monkeypatch.setattr(torch.cuda.profiler, "stop", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", refuse)
    window_module.profiler_start("cpu")
    window_module.profiler_stop(torch.device("cpu"))
    if not torch.cuda.is_available():
        window_module.profiler_start("cuda")  # no CUDA at all: a no-op too
        window_module.profiler_stop("cuda:0")
    monkeypatch.setenv(PROFILE_STEPS_ENV, "1:3")
    images = make(models).sample([0, 1], [5, 6])  # the real start/stop on a CPU sampler
    assert images.shape == (2, 3, 16, 16)


def test_profiler_window_with_injected_functions():
    calls = []
    window = ProfilerWindow(StepWindow(1, 2), "cpu", start=lambda d: calls.append("start"),
                            stop=lambda d: calls.append("stop"))
    for k in range(4):
        window.before_step(k)
        calls.append(k)
        window.after_step(k)
    window.close()  # idempotent
    assert calls == [0, "start", 1, "stop", 2, 3]


def test_every_step_runs_in_a_range_named_by_its_loop_index(models):
    sampler = make(models)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        sampler.sample([0], [1])
    names = {event.name for event in profiler.events()}
    assert {f"igds/step/{k}" for k in range(STEPS)} <= names
    assert f"igds/step/{STEPS}" not in names


def test_distill_refuses_a_bad_window_before_any_model_loads(tmp_path, monkeypatch):
    from igds_fast.distill import distill, distill_config
    from igds_fast.distill import run as run_module

    write_tiny_prior_and_ve(tmp_path)
    monkeypatch.setattr(run_module, "load_prior_unet", lambda *a, **k: pytest.fail("a model was loaded"))
    config = {"prior": str(tmp_path / "prior.safetensors"), "steps": 4, "batch_size": 2, "device": "cpu",
              "progress": False}
    ve = str(tmp_path / "ve.safetensors")
    with pytest.raises(IGDSInputError, match="--profile-steps 2:5 reaches past the 4 sampling steps"):
        distill(distill_config(ve, str(tmp_path / "a"), 1, profile_steps="2:5", **config))
    monkeypatch.setenv(PROFILE_STEPS_ENV, "x")
    with pytest.raises(IGDSInputError, match="IGDS_PROFILE_STEPS must be A:B"):
        distill(distill_config(ve, str(tmp_path / "b"), 1, **config))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
