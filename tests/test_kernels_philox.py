"""Per-image Philox noise: the documented stream (numpy re-implementation), statistics, keying,
batch independence, and equality with the noise the fused DDPM update draws in-kernel."""
import os

import numpy as np
import pytest
import torch

from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.kernels import fused_ddpm_update, philox_normal, seeds_to_tensor
from igds_fast.seeding import INITIAL_NOISE_STREAM, image_seed

from tolerances import tolerance

MASK32 = np.uint64(0xFFFFFFFF)


def numpy_philox_normal(seed: int, stream: int, numel: int) -> np.ndarray:
    """The stream of kernels/philox.py written out independently (Philox4x32-10 + Box-Muller)."""
    seed &= (1 << 64) - 1
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    quarters = (numel + 3) // 4
    c0 = np.arange(quarters, dtype=np.uint64)
    c1 = np.full(quarters, stream & 0xFFFFFFFF, dtype=np.uint64)
    c2 = np.zeros(quarters, dtype=np.uint64)
    c3 = np.zeros(quarters, dtype=np.uint64)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0  # both factors < 2^32: the product fits in uint64
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + np.uint64(0x9E3779B9)) & MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & MASK32

    def uniform(r):
        signed = r.astype(np.uint32).view(np.int32).astype(np.int64)
        signed = np.where(signed < 0, -signed - 1, signed)
        return signed.astype(np.float32) * np.float32(4.6566127342e-10)

    def box_muller(a, b):
        radius = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), a)))
        angle = np.float32(6.283185307179586) * b
        return radius * np.cos(angle), radius * np.sin(angle)

    n0, n1 = box_muller(uniform(c0), uniform(c1))
    n2, n3 = box_muller(uniform(c2), uniform(c3))
    return np.stack([n0, n1, n2, n3], axis=1).reshape(-1)[:numel]


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


def poisoned_noise(seeds, stream, shape, dtype=torch.float32):
    out = torch.full((len(seeds), *shape), float("nan"), dtype=dtype)
    got = philox_normal(seeds, stream, shape, "cpu", dtype, out=out)
    assert got is out
    assert not torch.isnan(out).any(), "a noise element was not written"
    return out


@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (2, 9), (3, 16, 16)])
@pytest.mark.parametrize("stream", [INITIAL_NOISE_STREAM, 0, 7, 249])
def test_matches_documented_stream(shape, stream):
    seeds = random_seeds(2) + [0, (1 << 64) - 5]  # includes a seed >= 2^63 (negative as int64)
    noise = poisoned_noise(seeds, stream, shape)
    numel = int(np.prod(shape))
    for row, seed in enumerate(seeds):
        expected = torch.from_numpy(numpy_philox_normal(seed, stream, numel)).reshape(shape)
        torch.testing.assert_close(noise[row], expected, **tolerance(torch.float32, "noise"))


def test_statistics():
    noise = poisoned_noise(random_seeds(4), 3, (3, 32, 32))
    flat = noise.flatten().double()
    n = flat.numel()
    # Every bound is 5 standard errors of its estimate at this n (fresh seeds each run: a tighter
    # bound fails by chance; the kurtosis bound was 2.3 standard errors and failed ~2% of runs).
    # A wrong distribution misses by far more (a uniform's kurtosis is 1.8, a Laplace's 6).
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.std().item() - 1.0) < 5 * (0.5 / n) ** 0.5  # var of the sample std: 1/(2n)
    assert abs((flat.abs() < 1).double().mean().item() - 0.6827) < 5 * (0.6827 * 0.3173 / n) ** 0.5  # 1-sigma mass
    assert abs((flat**3).mean().item()) < 5 * (15 / n) ** 0.5  # E[x^6] = 15
    assert abs((flat**4).mean().item() - 3.0) < 5 * (96 / n) ** 0.5  # E[x^8] - 9 = 96
    # Neighbouring elements (the four outputs of one Philox call) are uncorrelated.
    rows = noise.reshape(4, -1)
    lag1 = (rows[:, 1:] * rows[:, :-1]).mean().item()
    assert abs(lag1) < 0.05


def test_differs_across_seeds_and_streams():
    seeds = random_seeds(3)
    shape = (3, 8, 8)
    a = poisoned_noise(seeds, 5, shape)
    b = poisoned_noise(seeds, 6, shape)
    c = poisoned_noise(seeds, INITIAL_NOISE_STREAM, shape)
    adjacent = poisoned_noise([seeds[0], seeds[0] + 1], 5, shape)
    pairs = [(a[0], a[1]), (a[0], b[0]), (a[0], c[0]), (b[2], c[2]), (adjacent[0], adjacent[1])]
    for x, y in pairs:
        correlation = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].abs().item()
        assert correlation < 0.25
        assert not torch.equal(x, y)


def test_row_depends_only_on_its_seed():
    seeds = [image_seed(0, "n01440764", k) for k in range(5)]
    shape = (3, 6, 10)
    full = poisoned_noise(seeds, 12, shape)
    alone = poisoned_noise([seeds[3]], 12, shape)
    reordered = poisoned_noise([seeds[4], seeds[3], 17], 12, shape)
    assert torch.equal(full[3], alone[0])
    assert torch.equal(full[3], reordered[1])
    assert torch.equal(full[4], reordered[0])


def test_seed_tensor_and_dtype():
    seeds = random_seeds(3)
    from_list = poisoned_noise(seeds, 2, (4, 5))
    from_tensor = philox_normal(torch.tensor(seeds), 2, (4, 5), "cpu")
    assert torch.equal(from_list, from_tensor)
    as_double = philox_normal(seeds, 2, (4, 5), "cpu", torch.float64)
    assert as_double.dtype == torch.float64 and torch.equal(as_double.float(), from_list)
    assert seeds_to_tensor([(1 << 64) - 1], "cpu").item() == -1
    with pytest.raises(IGDSInputError):
        seeds_to_tensor(torch.tensor([1.5]), "cpu")


def test_update_kernel_adds_exactly_philox_normal(rng_seed):
    # The fused update with s = 0 and no guidance is mu + [i > 0] sigma * n: recover n from two
    # launches (with in-kernel Philox, and without noise) and compare with philox_normal.
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="20"))
    batch, shape = 3, (3, 5, 6)
    seeds = random_seeds(batch)
    x = torch.randn(batch, *shape)
    model_output = torch.cat([torch.randn(batch, *shape), torch.rand(batch, *shape) * 2 - 1], dim=1)
    for i in (11, 1):
        index = torch.tensor(i)
        noisy = fused_ddpm_update(x, model_output, index, schedule, True, seeds=seeds_to_tensor(seeds, "cpu"))
        mean = fused_ddpm_update(x, model_output, index, schedule, True)
        eps, v = model_output.split(3, dim=1)
        sigma = torch.exp(0.5 * schedule.log_variance(x, i, v))
        recovered = (noisy - mean) / sigma
        expected = philox_normal(seeds, i, shape, "cpu")
        torch.testing.assert_close(recovered, expected, rtol=1e-4, atol=1e-4)
        assert (recovered - expected).abs().max() < 1e-3 * expected.abs().max()
    # i == 0: the device-side [i > 0] gate drops the noise.
    last = fused_ddpm_update(x, model_output, torch.tensor(0), schedule, True, seeds=seeds)
    assert torch.equal(last, fused_ddpm_update(x, model_output, torch.tensor(0), schedule, True))
