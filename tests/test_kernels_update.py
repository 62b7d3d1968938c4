"""The x0-prediction and fused DDPM / DDIM update kernels against DiffusionSchedule / EagerStep's update."""
import os

import pytest
import torch

from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.kernels import DDIMStepTables, StepTables, fused_ddim_update, fused_ddpm_update, philox_normal, predict_x0

from tolerances import tolerance

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)",
)

SCHEDULES = {
    "linear-large": ScheduleConfig(noise_schedule="linear", sampling_steps="25", fixed_variance="large"),
    "cosine-small": ScheduleConfig(noise_schedule="cosine", sampling_steps="10", fixed_variance="small"),
}


def step_inputs(batch, shape, learn_sigma, device="cpu"):
    x = torch.randn(batch, *shape, device=device) * 1.5
    eps = torch.randn(batch, *shape, device=device)
    parts = [eps, torch.rand(batch, *shape, device=device) * 2 - 1] if learn_sigma else [eps]
    return x, torch.cat(parts, dim=1)


def eager_update(schedule, x, model_output, i, learn_sigma, grad, scale, noise, clip):
    """StepOps.update (the eager step's update), verbatim in its math."""
    eps, v = schedule.split_model_output(model_output, x.shape[1], learn_sigma)
    x0 = schedule.predict_x0(x, eps, i, clip=clip)
    mean = schedule.posterior_mean(x0, x, i)
    log_variance = schedule.log_variance(x, i, v)
    if grad is not None:
        mean = mean + scale * torch.exp(log_variance) * grad
    if i == 0 or noise is None:
        return mean
    return mean + torch.exp(0.5 * log_variance) * noise


def eager_ddim_update(schedule, ddim, x, model_output, i, learn_sigma, grad, scale, noise, clip):
    """StepOps.ddim_update (the eager step's DDIM update), verbatim in its math."""
    eps, _ = schedule.split_model_output(model_output, x.shape[1], learn_sigma)
    x0 = schedule.predict_x0(x, eps, i, clip=clip)
    eps = schedule.predict_eps(x, x0, i)
    if grad is not None:
        eps = eps - schedule.gather(ddim.sqrt_one_minus_alphas_cumprod, i, x.dim()) * (scale * grad)
        x0 = schedule.predict_x0(x, eps, i, clip=False)
        eps = schedule.predict_eps(x, x0, i)
    out = schedule.ddim_mean(x0, eps, i, ddim)
    if i == 0 or noise is None:
        return out
    return out + schedule.gather(ddim.sigma, i, x.dim()) * noise


def poisoned(like):
    return torch.full_like(like, float("nan"))


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("clip", [True, False])
def test_predict_x0(rng_seed, schedule_name, learn_sigma, clip):
    schedule = DiffusionSchedule(SCHEDULES[schedule_name])
    x, model_output = step_inputs(2, (3, 5, 7), learn_sigma)
    for i in (0, schedule.num_steps // 2, schedule.num_steps - 1):
        out = poisoned(x)
        predict_x0(x, model_output, torch.tensor(i), schedule, learn_sigma, clip, out=out)
        eps = model_output[:, :3]
        expected = schedule.predict_x0(x, eps, i, clip=clip)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, "elementwise"))
        if clip:
            assert out.abs().max() <= 1.0


# (guided, noise mode) combinations; noise modes: None, a given tensor, in-kernel Philox from seeds.
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
def test_fused_update_matches_eager(rng_seed, schedule_name, learn_sigma, guided, noise_mode):
    schedule = DiffusionSchedule(SCHEDULES[schedule_name])
    tables = StepTables(schedule)
    batch, shape = 3, (3, 6, 5)  # 90 elements per image: a masked tail in the last block
    x, model_output = step_inputs(batch, shape, learn_sigma)
    grad = torch.randn_like(x) if guided else None
    scale = 2.5
    seeds = [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(batch)]
    for i in (schedule.num_steps - 1, 3, 0):
        if noise_mode == "tensor":
            noise, kernel_seeds = torch.randn_like(x), None
        elif noise_mode == "philox":
            noise, kernel_seeds = philox_normal(seeds, i, shape, "cpu"), torch.tensor(seeds)
        else:
            noise, kernel_seeds = None, None
        out = poisoned(x)
        fused_ddpm_update(
            x, model_output, torch.tensor(i), tables, learn_sigma, grad=grad, scale=scale,
            noise=noise if noise_mode == "tensor" else None, seeds=kernel_seeds, clip=True, out=out,
        )
        expected = eager_update(schedule, x, model_output, i, learn_sigma, grad, scale, noise, True)
        assert not torch.isnan(out).any(), "an output element was not written"
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, "elementwise"))


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "philox"])
@pytest.mark.parametrize("clip", [True, False])
def test_fused_ddim_update_matches_eager(rng_seed, schedule_name, learn_sigma, guided, noise_mode, clip):
    schedule = DiffusionSchedule(SCHEDULES[schedule_name])
    ddim = schedule.ddim(0.8)
    tables = DDIMStepTables(schedule, ddim)
    batch, shape = 3, (3, 6, 5)  # 90 elements per image: a masked tail in the last block
    x, model_output = step_inputs(batch, shape, learn_sigma)
    grad = torch.randn_like(x) if guided else None
    seeds = [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(batch)]
    for i in (schedule.num_steps - 1, 3, 1, 0):
        if noise_mode == "tensor":
            noise, kernel_seeds = torch.randn_like(x), None
        elif noise_mode == "philox":
            noise, kernel_seeds = philox_normal(seeds, i, shape, "cpu"), torch.tensor(seeds)
        else:
            noise, kernel_seeds = None, None
        out = poisoned(x)
        fused_ddim_update(x, model_output, torch.tensor(i), tables, learn_sigma, grad=grad, scale=2.5,
                          noise=noise if noise_mode == "tensor" else None, seeds=kernel_seeds, clip=clip, out=out)
        expected = eager_ddim_update(schedule, ddim, x, model_output, i, learn_sigma, grad, 2.5, noise, clip)
        assert not torch.isnan(out).any(), "an output element was not written"
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, "elementwise"))


def test_ddim_shift_sigma_and_variance_half(rng_seed):
    # The guided shift, the noise and a learned-sigma UNet's unread variance half, each checked on its own:
    # an equality test at a small scale or eta would pass a kernel that dropped any of them.
    schedule = DiffusionSchedule(SCHEDULES["linear-large"])
    ddim = schedule.ddim(1.0)
    tables = DDIMStepTables(schedule, ddim)
    x, model_output = step_inputs(2, (3, 4, 4), True)
    grad, noise, index = torch.randn_like(x), torch.randn_like(x), torch.tensor(12)
    base = fused_ddim_update(x, model_output, index, tables, True)
    guided = fused_ddim_update(x, model_output, index, tables, True, grad=grad, scale=3.0)
    # eps -= sqrt(1 - abar) s g moves x_{i-1} by (sqrt(abar_prev) (1 - abar) / sqrt(abar) - direction sqrt(1 - abar)) s g
    abar, abar_prev = schedule.alphas_cumprod[12], schedule.alphas_cumprod[11]
    factor = abar_prev.sqrt() * (1 - abar) / abar.sqrt() - ddim.direction[12] * (1 - abar).sqrt()
    torch.testing.assert_close(guided - base, factor * 3.0 * grad, rtol=1e-4, atol=1e-5)
    noisy = fused_ddim_update(x, model_output, index, tables, True, noise=noise)
    torch.testing.assert_close(noisy - base, ddim.sigma[12] * noise, rtol=1e-4, atol=1e-5)
    assert (guided - base).abs().max() > 1e-3 and ddim.sigma[12] > 1e-2
    other_half = model_output.clone()
    other_half[:, 3:] = torch.rand_like(other_half[:, 3:])
    assert torch.equal(fused_ddim_update(x, other_half, index, tables, True), base)
    with pytest.raises(IGDSInputError, match="DDIMStepTables"):
        fused_ddim_update(x, model_output, index, StepTables(schedule), True)


def test_step_index_forms_and_fp64_tables(rng_seed):
    # int32 and [1]-shaped device indices read the same coefficients; fp64 tables are cast once.
    schedule = DiffusionSchedule(SCHEDULES["linear-large"], dtype=torch.float64)
    x, model_output = step_inputs(2, (1, 4, 4), True)
    grad = torch.randn_like(x)
    expected = eager_update(schedule, x.double(), model_output.double(), 7, True, grad.double(), 1.5, None, True).float()
    for index in (torch.tensor(7), torch.tensor([7], dtype=torch.int32), torch.arange(10)[7]):
        got = fused_ddpm_update(x, model_output, index, schedule, True, grad=grad, scale=1.5)
        torch.testing.assert_close(got, expected, **tolerance(torch.float32, "elementwise"))


def test_guided_term_and_noise_move_the_result(rng_seed):
    # A kernel that dropped the guided term or the noise would pass an equality test at scale ~ 0;
    # check that each moves the result by its eager amount.
    schedule = DiffusionSchedule(SCHEDULES["linear-large"])
    x, model_output = step_inputs(2, (3, 4, 4), True)
    grad = torch.randn_like(x)
    index = torch.tensor(20)
    base = fused_ddpm_update(x, model_output, index, schedule, True)
    guided = fused_ddpm_update(x, model_output, index, schedule, True, grad=grad, scale=3.0)
    log_var = schedule.log_variance(x, 20, model_output[:, 3:])
    torch.testing.assert_close(guided - base, 3.0 * torch.exp(log_var) * grad, rtol=1e-4, atol=1e-5)
    assert (guided - base).abs().max() > 1e-3


def test_rejects_bad_shapes():
    schedule = DiffusionSchedule(SCHEDULES["cosine-small"])
    x, model_output = step_inputs(2, (3, 4, 4), True)
    with pytest.raises(IGDSInputError, match="model output"):
        fused_ddpm_update(x, model_output, torch.tensor(1), schedule, learn_sigma=False)
    with pytest.raises(IGDSInputError, match="step_index"):
        fused_ddpm_update(x, model_output, 1, schedule, True)
    with pytest.raises(IGDSInputError, match="seeds"):
        fused_ddpm_update(x, model_output, torch.tensor(1), schedule, True, seeds=[1, 2, 3])
    with pytest.raises(IGDSInputError, match="grad"):
        fused_ddpm_update(x, model_output, torch.tensor(1), schedule, True, grad=x[:1])


@gpu_only
def test_fused_update_real_size_gpu(rng_seed):
    schedule = DiffusionSchedule(ScheduleConfig(), device="cuda")
    x, model_output = step_inputs(8, (3, 256, 256), True, device="cuda")
    grad = torch.randn_like(x)
    seeds = torch.randint(0, 2**62, (8,), device="cuda")
    i = 123
    out = poisoned(x)
    fused_ddpm_update(x, model_output, torch.tensor(i, device="cuda"), schedule, True, grad=grad,
                      scale=2.0, seeds=seeds, out=out)
    noise = philox_normal(seeds, i, (3, 256, 256), "cuda")
    expected = eager_update(schedule, x, model_output, i, True, grad, 2.0, noise, True)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32, "noise"))


@gpu_only
def test_update_replays_in_cuda_graph_with_device_step_index(rng_seed):
    # The step index is device memory: a captured graph replays whatever step it holds.
    schedule = DiffusionSchedule(ScheduleConfig(), device="cuda")
    tables = StepTables(schedule)
    x, model_output = step_inputs(4, (3, 32, 32), True, device="cuda")
    grad = torch.randn_like(x)
    seeds = torch.randint(0, 2**62, (4,), device="cuda")
    index = torch.tensor(200, device="cuda")
    out = torch.empty_like(x)
    run = lambda: fused_ddpm_update(x, model_output, index, tables, True, grad=grad, scale=1.5, seeds=seeds, out=out)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for i in (57, 0):
        index.fill_(i)
        out.fill_(float("nan"))
        graph.replay()
        noise = philox_normal(seeds, i, (3, 32, 32), "cuda")
        expected = eager_update(schedule, x, model_output, i, True, grad, 1.5, noise, True)
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, "noise"))


@gpu_only
def test_ddim_update_real_size_and_in_a_cuda_graph_gpu(rng_seed):
    schedule = DiffusionSchedule(ScheduleConfig(), device="cuda")
    ddim = schedule.ddim(0.5)
    tables = DDIMStepTables(schedule, ddim)
    x, model_output = step_inputs(8, (3, 256, 256), True, device="cuda")
    grad = torch.randn_like(x)
    seeds = torch.randint(0, 2**62, (8,), device="cuda")
    index = torch.tensor(123, device="cuda")
    out = torch.empty_like(x)
    run = lambda: fused_ddim_update(x, model_output, index, tables, True, grad=grad, scale=2.0, seeds=seeds, out=out)
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for i in (123, 1, 0):
        index.fill_(i)
        out.fill_(float("nan"))
        graph.replay()
        noise = philox_normal(seeds, i, (3, 256, 256), "cuda")
        expected = eager_ddim_update(schedule, ddim, x, model_output, i, True, grad, 2.0, noise, True)
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, "noise"))
