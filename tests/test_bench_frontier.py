"""bench/frontier.py's DPM-Solver++(2M) trial: its first step is DDIM's (eta 0) with IGDS's score shift, its
later steps add the second-order term; and the report's table and plot from a results dict."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from factories import tiny_adm, tiny_ve
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
frontier = pytest.importorskip("bench.frontier")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_trial_solver_starts_as_ddim_then_goes_second_order(rng_seed):
    unet, ve = tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)
    schedule = DiffusionSchedule(ScheduleConfig("cosine", 1000, "8"))
    sampler = Sampler(unet, schedule, ve, GuidanceConfig(scale=2.0, beta=0.3), prior_class_map=[5, 6, 7, 8],
                      sampler="ddim", eta=0.0)
    labels, seeds = [0, 3], [11, 12]
    with sampler.batch(labels, seeds) as run:
        ddim = []
        for _ in range(2):
            run.step()
            ddim.append(run.x.clone())
    first = frontier.dpmpp2m_sample(sampler, labels, seeds, stop_after=1)
    torch.testing.assert_close(first, ddim[0], rtol=1e-5, atol=1e-5)  # DPM-Solver++ first order = DDIM
    second = frontier.dpmpp2m_sample(sampler, labels, seeds, stop_after=2)
    assert (second - ddim[1]).abs().max() > 1e-4  # the multistep correction is applied
    final = frontier.dpmpp2m_sample(sampler, labels, seeds)
    assert final.shape == (2, 3, 16, 16) and final.abs().max() <= 1


def test_the_trial_solver_steps_as_diffusers_dpmsolver_plus_plus_2m(rng_seed):
    """Given the trial's own data predictions D_i (x0, guided), diffusers' DPMSolverMultistepScheduler
    (dpmsolver++, order 2, midpoint; prediction_type "sample" so D_i is used as is) makes the same
    x_{i-1} at every step: the trial's lambda, h, r and second-order coefficients are diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    from igds_fast.diffusion import cosine_betas

    unet, ve = tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)
    schedule = DiffusionSchedule(ScheduleConfig("cosine", 1000, "8"))
    sampler = Sampler(unet, schedule, ve, GuidanceConfig(scale=2.0, beta=0.3), prior_class_map=[5, 6, 7, 8],
                      sampler="ddim", eta=0.0)
    trace = []
    ours = frontier.dpmpp2m_sample(sampler, [0, 3], [11, 12], stop_after=5, trace=trace)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=cosine_betas(1000).tolist(), solver_order=2,
        prediction_type="sample", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False)
    scheduler.set_timesteps(timesteps=list(reversed(schedule.kept_timesteps)))
    x = trace[0][0].double()
    for k, (x_k, data) in enumerate(trace):
        torch.testing.assert_close(x.float(), x_k, rtol=1e-4, atol=1e-4)  # x_i before step k: the same
        x = scheduler.step(data.double(), scheduler.timesteps[k], x).prev_sample
    torch.testing.assert_close(x.float(), ours, rtol=1e-4, atol=1e-4)


def test_table_and_plot(tmp_path):
    point = {"mean": 90.0, "std": 1.0, "s_per_image": 0.1}
    results = {"ipcs": [1, 10], "steps": [10, 25], "samplers": ["ddpm", "ddim"],
               "points": {frontier.point_key(10, "ddim", 10): point, frontier.point_key(1, "ddpm", 25): point},
               "flop_costs": {"adm256": 2.5, "dit-xl2-256": 1.0}}
    text = frontier.table(results)
    assert "| DDIM (eta 0), guided from step 0 | 10 | - | - | 90.00 ± 1.00 | 0.100 |" in text
    assert "| adm256 (x4 samples: 2x2 composite) | 2.50 | 100 | 250 |" in text
    frontier.plot(results, str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").stat().st_size > 1000
