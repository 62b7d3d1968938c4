"""The schedule and reverse-step pieces against guided-diffusion's GaussianDiffusion / SpacedDiffusion."""
import numpy as np
import pytest
import torch

from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig, space_timesteps
from igds_fast.errors import IGDSInputError

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
respace = pytest.importorskip("guided_diffusion.respace")

TABLES = {
    # ours: guided-diffusion's attribute
    "betas": "betas",
    "alphas_cumprod": "alphas_cumprod",
    "sqrt_recip_alphas_cumprod": "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod": "sqrt_recipm1_alphas_cumprod",
    "posterior_variance": "posterior_variance",
    "posterior_log_variance_clipped": "posterior_log_variance_clipped",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


def reference_diffusion(schedule_name, steps, respacing, learn_sigma=True, sigma_small=False):
    betas = gd.get_named_beta_schedule(schedule_name, steps)
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(steps, respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=gd.LossType.MSE,
        rescale_timesteps=False,
    )


@pytest.mark.parametrize("counts", ["250", "1000", "ddim25", "10,15,20", "1", "7", "50,3"])
def test_space_timesteps_matches_guided_diffusion(counts):
    assert space_timesteps(1000, counts) == sorted(respace.space_timesteps(1000, counts))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("respacing", ["250", "1000", "ddim50", "30,20"])
def test_tables_match_guided_diffusion(name, respacing):
    ours = DiffusionSchedule(ScheduleConfig(name, 1000, respacing))
    ref = reference_diffusion(name, 1000, respacing)
    assert ours.num_steps == ref.num_timesteps
    assert ours.timestep_map.tolist() == list(ref.timestep_map)
    for mine, theirs in TABLES.items():
        expected = torch.from_numpy(getattr(ref, theirs)).float()  # gd casts float64 -> float32 per use
        assert torch.equal(getattr(ours, mine), expected), mine
    assert torch.equal(ours.log_betas, torch.from_numpy(np.log(ref.betas)).float())


@pytest.mark.parametrize("fixed", ["large", "small"])
def test_fixed_variance_matches_guided_diffusion(fixed):
    ours = DiffusionSchedule(ScheduleConfig("linear", 1000, "100", fixed_variance=fixed))
    ref = reference_diffusion("linear", 1000, "100", learn_sigma=False, sigma_small=fixed == "small")
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 50, 99])
    eps = torch.randn_like(x)
    out = ref.p_mean_variance(lambda x_, t_: eps, x, t, clip_denoised=True)
    ours_log_var = DiffusionSchedule.gather(ours.fixed_log_variance, t, 4)
    assert torch.allclose(ours_log_var.expand_as(x), out["log_variance"].float(), rtol=0, atol=0)


def test_gather_gives_the_same_values_for_int_0d_and_batched_indices():
    table = torch.rand(17) + 0.5
    for index in (0, 5, 16):
        by_int = DiffusionSchedule.gather(table, index, 4)
        by_tensor = DiffusionSchedule.gather(table, torch.tensor(index), 4)
        assert by_int.shape == by_tensor.shape == () and torch.equal(by_int, by_tensor)
        assert by_tensor.item() == table[index].item()
    batched = torch.tensor([3, 0, 16])
    out = DiffusionSchedule.gather(table, batched, 4)
    assert out.shape == (3, 1, 1, 1) and torch.equal(out.flatten(), table[[3, 0, 16]])


def test_step_pieces_match_p_mean_variance():
    """x0 prediction, posterior mean and learned-range variance against gd for a random model output."""
    ours = DiffusionSchedule(ScheduleConfig("cosine", 1000, "250"))
    ref = reference_diffusion("cosine", 1000, "250")
    batch, channels = 5, 3
    x = torch.randn(batch, channels, 6, 6) * 1.5
    t = torch.randint(0, 250, (batch,))
    t[0], t[1] = 0, 249
    model_output = torch.randn(batch, 2 * channels, 6, 6)
    model_output[:, channels:] = torch.rand(batch, channels, 6, 6) * 2 - 1  # v in [-1, 1]
    out = ref.p_mean_variance(lambda x_, t_: model_output, x, t, clip_denoised=True)

    eps, v = ours.split_model_output(model_output, channels, learn_sigma=True)
    x0 = ours.predict_x0(x, eps, t, clip=True)
    mean = ours.posterior_mean(x0, x, t)
    log_var = ours.log_variance(x, t, v)
    torch.testing.assert_close(x0, out["pred_xstart"], rtol=0, atol=0)
    torch.testing.assert_close(mean, out["mean"], rtol=0, atol=0)
    torch.testing.assert_close(log_var, out["log_variance"], rtol=0, atol=0)
    # a Python int index gives the same values as a tensor index
    torch.testing.assert_close(ours.predict_x0(x[:1], eps[:1], 17), ours.predict_x0(x[:1], eps[:1], torch.tensor([17])))


def test_tables_live_on_device_and_are_built_once():
    schedule = DiffusionSchedule(ScheduleConfig())
    for name in DiffusionSchedule.TABLES:
        table = getattr(schedule, name)
        assert table.shape == (250,) and table.dtype == torch.float32 and table.device == schedule.device
    assert schedule.kept_timesteps[0] == 0 and schedule.kept_timesteps[-1] == 999


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_schedule="quadratic"), "noise schedule"),
        (dict(sampling_steps="0"), "positive"),
        (dict(sampling_steps="2000"), "cannot take 2000"),
        (dict(sampling_steps="ddim999"), "stride"),
        (dict(sampling_steps="abc"), "integer"),
        (dict(diffusion_steps=0), "diffusion_steps"),
        (dict(fixed_variance="medium"), "fixed_variance"),
    ],
)
def test_bad_schedule_config(kwargs, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        ScheduleConfig(**kwargs)
    assert "\n" not in str(info.value)
