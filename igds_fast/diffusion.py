"""The DDPM noise schedule, timestep respacing and the reverse-step coefficients (ADM conventions).

Everything here follows guided-diffusion's `gaussian_diffusion.py` / `respace.py` numerically:
coefficients are computed once in float64 with numpy and cast to the table dtype, exactly as
guided-diffusion's `_extract_into_tensor` does per call. The tables then live on the target device so
that a reverse step indexes them with an integer or a device-side index tensor: no host-to-device
copy and no `.item()` inside the 250-step loop (the compiled sampler captures the step in a CUDA
graph).

Notation (respaced process with N kept steps, index i = 0 .. N-1, i = N-1 is pure noise):

    beta_i            kept betas, recomputed from the kept alpha-bars: 1 - abar_i / abar_{i-1}
    abar_i            cumulative product of (1 - beta), equal to the original abar at t = timestep_map[i]
    x0_hat            = sqrt(1/abar_i) * x_t - sqrt(1/abar_i - 1) * eps            [B, C, H, W]
    mu                = coef1_i * x0_hat + coef2_i * x_t                            [B, C, H, W]
    log sigma^2       = frac * log beta_i + (1 - frac) * log beta~_i, frac = (v + 1) / 2  (learned range)
    beta~_i           = beta_i (1 - abar_{i-1}) / (1 - abar_i), its log clipped at i = 0 to beta~_1

DDIM (Song et al. 2021, eq. 12; guided-diffusion's `ddim_sample`) reads the same abar and, at one eta,
the tables of `DDIMTables` (`DiffusionSchedule.ddim(eta)`):

    sigma_i           = eta sqrt((1 - abar_{i-1}) / (1 - abar_i)) sqrt(1 - abar_i / abar_{i-1})
    x_{i-1}           = sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1} - sigma_i^2) eps + sigma_i n
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import IGDSInputError
from .limits import HEADER_CAPS

NOISE_SCHEDULES = ("linear", "cosine", "scaled_linear")
FIXED_VARIANCES = ("small", "large")
SAMPLERS = ("ddpm", "ddim")  # the reverse update: DDPM's ancestral posterior step, or DDIM's (eta = its noise)


def resolve_eta(sampler: str, eta, what: str = "sampler") -> float | None:
    """The eta of a sampler: None for "ddpm" (which has none: an eta given is refused), else the given
    eta or 0 (deterministic DDIM); one-line IGDSInputError for an unknown sampler or an eta outside [0, 1]."""
    if sampler not in SAMPLERS:
        raise IGDSInputError(f"unknown {what} {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "ddpm":
        if eta is not None:
            raise IGDSInputError(f"eta applies to {what} 'ddim' only (DDPM's noise is its posterior variance)")
        return None
    if eta is None:
        return 0.0
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise IGDSInputError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior "
                             f"variance), got {eta!r}")
    return float(eta)


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so any step count spans the same range as 1000 steps.

    Returns float64 [num_steps].
    """
    scale = 1000.0 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: abar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2).

    beta_i = min(1 - abar((i + 1) / n) / abar(i / n), max_beta); float64 [num_steps].
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def named_betas(name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """float64 [num_steps] betas of a named schedule.

    "linear": guided-diffusion's (`linear_betas`), or np.linspace(beta_start, beta_end) when both are
    given (diffusers' "linear"); "scaled_linear": linspace(sqrt(start), sqrt(end))^2 (diffusers'
    latent-diffusion schedule; start and end required); "cosine": Nichol & Dhariwal's (diffusers'
    "squaredcos_cap_v2").
    """
    if name == "linear":
        if beta_start is None:
            return linear_betas(num_steps)
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
    if name == "cosine":
        return cosine_betas(num_steps)
    raise IGDSInputError(f"unknown noise schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The original timesteps kept when respacing, exactly as guided-diffusion's `space_timesteps`.

    `section_counts` is an int, a list of ints, a comma-separated string ("250", "10,15,20") or
    "ddimN" (a fixed stride). The process is cut into len(section_counts) equal parts and each part is
    sampled evenly with Python's round() (banker's rounding — kept for bit-exact step sets).
    Returns the sorted kept timesteps.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_positive_int(spec[len("ddim"):], "ddim step count")
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise IGDSInputError(f"cannot create exactly {desired} steps with an integer stride")
        counts = [_parse_positive_int(part, "step count") for part in spec.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c <= 0 for c in counts):
        raise IGDSInputError(f"step counts must be positive integers, got {section_counts!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for section, count in enumerate(counts):
        size = size_per + (1 if section < extra else 0)
        if size < count:
            raise IGDSInputError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _parse_positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise IGDSInputError(f"{what} must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise IGDSInputError(f"{what} must be a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class ScheduleConfig:
    """How the diffusion process of the prior was trained and how many steps to sample with.

    noise_schedule: "linear" (ADM 128/256) or "cosine" (ADM 64).
    diffusion_steps: training steps T (1000 for every public ADM checkpoint).
    sampling_steps: kept steps, guided-diffusion's `timestep_respacing` ("250", "ddim25", "10,20").
    fixed_variance: variance for priors without learned sigma: "large" = beta (guided-diffusion's
        default FIXED_LARGE, first entry beta~_1) or "small" = beta~ (posterior variance).
    beta_start / beta_end: the beta range of a "linear" schedule given explicitly (diffusers'
        scheduler configs; None = guided-diffusion's scaled 1e-4 .. 2e-2) or of "scaled_linear"
        (required there).
    """

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    sampling_steps: str = "250"
    fixed_variance: str = "large"
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self):
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise IGDSInputError(
                f"unknown noise schedule {self.noise_schedule!r}; expected one of {NOISE_SCHEDULES}"
            )
        cap = HEADER_CAPS["diffusion steps"]
        if (isinstance(self.diffusion_steps, bool) or not isinstance(self.diffusion_steps, int)
                or not 1 < self.diffusion_steps <= cap):
            raise IGDSInputError(f"diffusion_steps must be an integer in (1, {cap}], got {self.diffusion_steps!r}")
        if self.fixed_variance not in FIXED_VARIANCES:
            raise IGDSInputError(
                f"fixed_variance must be one of {FIXED_VARIANCES}, got {self.fixed_variance!r}"
            )
        given = (self.beta_start is not None, self.beta_end is not None)
        if given[0] != given[1]:
            raise IGDSInputError("give both beta_start and beta_end, or neither")
        if self.noise_schedule == "cosine" and given[0]:
            raise IGDSInputError("the cosine schedule has no beta range (beta_start / beta_end)")
        if self.noise_schedule == "scaled_linear" and not given[0]:
            raise IGDSInputError("the scaled_linear schedule needs beta_start and beta_end")
        if given[0] and not 0 < self.beta_start < self.beta_end < 1:
            raise IGDSInputError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start!r}, {self.beta_end!r}")
        object.__setattr__(self, "sampling_steps", str(self.sampling_steps))
        space_timesteps(self.diffusion_steps, self.sampling_steps)  # validates the spec early

    def to_dict(self) -> dict:
        """The fields as a dict, the beta range only when given (folders written before it stay comparable)."""
        fields = dataclasses.asdict(self)
        for name in ("beta_start", "beta_end"):
            if fields[name] is None:
                del fields[name]
        return fields


@dataclass(frozen=True)
class DDIMTables:
    """DDIM's per-step tables at one eta ([num_steps] each, on the schedule's device; `DiffusionSchedule.ddim`).

    sqrt_alphas_cumprod_prev: sqrt(abar_{i-1}) (1 at i = 0); sqrt_one_minus_alphas_cumprod: sqrt(1 - abar_i),
    the score shift's factor (guided-diffusion's condition_score); sigma: the noise's std (0 for eta = 0
    and at i = 0); direction: sqrt(1 - abar_{i-1} - sigma_i^2), the factor of eps.
    """

    eta: float
    sqrt_alphas_cumprod_prev: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sigma: torch.Tensor
    direction: torch.Tensor


class DiffusionSchedule:
    """Respaced DDPM coefficient tables on one device, indexed by the respaced step i.

    All tables are 1-D tensors of length `num_steps` (float32 by default, computed in float64);
    `timestep_map[i]` is the original training timestep the UNet must be called with.
    """

    TABLES = (
        "betas",
        "log_betas",
        "alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_variance",
        "fixed_log_variance",
    )

    def __init__(self, config: ScheduleConfig = ScheduleConfig(), device="cpu", dtype=torch.float32):
        self.config = config
        base_betas = named_betas(config.noise_schedule, config.diffusion_steps, config.beta_start, config.beta_end)
        kept = space_timesteps(config.diffusion_steps, config.sampling_steps)
        base_abar = np.cumprod(1.0 - base_betas)
        # Respacing: betas recomputed from the kept alpha-bars (guided-diffusion's SpacedDiffusion).
        kept_abar = base_abar[kept]
        previous = np.append(1.0, kept_abar[:-1])
        betas = 1.0 - kept_abar / previous
        self.num_steps = len(kept)
        self.device = torch.device(device)
        self.dtype = dtype
        for name, values in self._coefficients(betas, config.fixed_variance).items():
            setattr(self, name, torch.tensor(values, dtype=dtype, device=self.device))
        self.timestep_map = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.kept_timesteps = tuple(int(t) for t in kept)
        self._kept_betas = betas  # float64, for tables built later (DDIM's at one eta)

    def ddim(self, eta: float) -> "DDIMTables":
        """DDIM's coefficient tables at `eta` (module docstring), on the schedule's device, built once per
        sampler (never per step).

        Computed as guided-diffusion's `ddim_sample` computes them at every step: in the table dtype
        from the alpha-bars cast to it (its `_extract_into_tensor`), in its order, on the CPU (IEEE
        float arithmetic: the same on every device). So our step equals its step: float64 tables would
        be more exact but differ from it by up to 4e-5 at i = 1, where 1 - abar_{i-1} cancels (abar_0 =
        0.9999) -- as diffusers' DDIMScheduler, which also works in float32. 1 - abar_{i-1} - sigma^2 is
        floored at 0 (eta = 1 at i = N-1 may round below it, a NaN in guided-diffusion's step).
        """
        eta = resolve_eta("ddim", eta)
        abar64 = np.cumprod(1.0 - self._kept_betas)
        abar = torch.tensor(abar64, dtype=self.dtype)
        abar_prev = torch.tensor(np.append(1.0, abar64[:-1]), dtype=self.dtype)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        tables = {"sqrt_alphas_cumprod_prev": torch.sqrt(abar_prev), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
                  "sigma": sigma, "direction": torch.sqrt((1 - abar_prev - sigma ** 2).clamp_min(0.0))}
        return DDIMTables(eta, **{name: values.to(self.device) for name, values in tables.items()})

    @staticmethod
    def _coefficients(betas: np.ndarray, fixed_variance: str) -> dict[str, np.ndarray]:
        if len(betas) < 2:  # step 0's log variance is clipped to step 1's: a one-step loop has none
            raise IGDSInputError(f"a sampling loop needs at least 2 steps, got {len(betas)}")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # beta~_0 is 0; its log is clipped to beta~_1 (guided-diffusion), as is FIXED_LARGE's first entry.
        clipped_log_posterior = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        if fixed_variance == "large":
            fixed = np.append(posterior_variance[1], betas[1:])
            fixed_log = np.log(fixed)
        else:
            fixed, fixed_log = posterior_variance, clipped_log_posterior
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": abar,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": clipped_log_posterior,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "fixed_variance": fixed,
            "fixed_log_variance": fixed_log,
        }

    def to(self, device) -> "DiffusionSchedule":
        """A copy of the tables on another device (built once, never per step)."""
        return DiffusionSchedule(self.config, device=device, dtype=self.dtype)

    # ---- per-step coefficient gathers --------------------------------------------------------
    @staticmethod
    def gather(table: torch.Tensor, i, ndim: int) -> torch.Tensor:
        """table[i] shaped to broadcast against a [B, ...] tensor of `ndim` dims.

        `i` is a Python int (eager loop) or an integer tensor on the table's device (0-d or [B]);
        neither path copies from the host nor synchronises. A tensor index goes through index_select:
        `table[i]` with a 0-d integer tensor would read i back to the host (a basic-indexing select,
        `.item()` in C++), which a CUDA-graph capture refuses.
        """
        if isinstance(i, torch.Tensor):
            value = table.index_select(0, i.reshape(-1))
            if i.dim() == 0:
                return value.reshape(())
        else:
            value = table[i]
        if value.dim() == 0:
            return value
        return value.reshape(-1, *([1] * (ndim - 1)))

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, i, clip: bool = True) -> torch.Tensor:
        """x0_hat = sqrt(1/abar_i) x_t - sqrt(1/abar_i - 1) eps, clipped to [-1, 1]. Shapes [B, C, H, W]."""
        x0 = (
            self.gather(self.sqrt_recip_alphas_cumprod, i, x_t.dim()) * x_t
            - self.gather(self.sqrt_recipm1_alphas_cumprod, i, x_t.dim()) * eps
        )
        return x0.clamp(-1.0, 1.0) if clip else x0

    def ddim_guidance_factor(self, tables: "DDIMTables") -> torch.Tensor:
        """[num_steps] float64: how far DDIM's score shift moves x_{i-1} per unit of s * g.

        eps - sqrt(1 - abar_i) s g moves x0 by (1 - abar_i) / sqrt(abar_i) s g, and x_{i-1} by
        sqrt(abar_{i-1}) (1 - abar_i) / sqrt(abar_i) - direction_i sqrt(1 - abar_i) times s g; DDPM's mean
        shift is sigma_i^2 <= beta_i <= 1 times s g. The two agree where abar_i / abar_{i-1} is near 1
        (many steps, a linear schedule); at the first step of a cosine schedule (abar_{N-1} = 2.4e-9 at
        t = 999, max_beta clipped) DDIM's is 1e2 (250 steps) to 3.5e3 (10 steps).
        """
        abar = self.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return (abar_prev.sqrt() * (1 - abar) / abar.sqrt()
                - tables.direction.double().cpu().to(abar.device) * (1 - abar).sqrt())

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, i) -> torch.Tensor:
        """eps = (sqrt(1/abar_i) x_t - x0) / sqrt(1/abar_i - 1): the noise an x0 implies (guided-diffusion's
        `_predict_eps_from_xstart`, in its order). Shapes [B, C, H, W]."""
        return (self.gather(self.sqrt_recip_alphas_cumprod, i, x_t.dim()) * x_t - x0) / self.gather(
            self.sqrt_recipm1_alphas_cumprod, i, x_t.dim())

    def ddim_mean(self, x0: torch.Tensor, eps: torch.Tensor, i, tables: "DDIMTables") -> torch.Tensor:
        """sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1} - sigma_i^2) eps: DDIM's x_{i-1} before its noise."""
        return (self.gather(tables.sqrt_alphas_cumprod_prev, i, x0.dim()) * x0
                + self.gather(tables.direction, i, x0.dim()) * eps)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, i) -> torch.Tensor:
        """mu = coef1_i x0 + coef2_i x_t, the mean of q(x_{i-1} | x_i, x0). Shapes [B, C, H, W]."""
        return (
            self.gather(self.posterior_mean_coef1, i, x_t.dim()) * x0
            + self.gather(self.posterior_mean_coef2, i, x_t.dim()) * x_t
        )

    def log_variance(self, x_t: torch.Tensor, i, variance_output: torch.Tensor | None) -> torch.Tensor:
        """log sigma^2_i: learned-range interpolation when the model outputs v, else the fixed table.

        variance_output v: [B, C, H, W] in [-1, 1] (the second half of a learned-sigma UNet output).
        Returns a tensor broadcastable to x_t.
        """
        if variance_output is None:
            return self.gather(self.fixed_log_variance, i, x_t.dim())
        min_log = self.gather(self.posterior_log_variance_clipped, i, x_t.dim())
        max_log = self.gather(self.log_betas, i, x_t.dim())
        frac = (variance_output + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def split_model_output(self, model_output: torch.Tensor, channels: int, learn_sigma: bool):
        """(eps, v) from a UNet output [B, 2C or C, H, W]; v is None without learned sigma."""
        if learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise IGDSInputError(
                    f"learned-sigma model must output {2 * channels} channels, got {model_output.shape[1]}"
                )
            eps, v = torch.split(model_output, channels, dim=1)
            return eps, v
        if model_output.shape[1] != channels:
            raise IGDSInputError(f"model must output {channels} channels, got {model_output.shape[1]}")
        return model_output, None

    def q_sample(self, x0: torch.Tensor, t_index, noise: torch.Tensor) -> torch.Tensor:
        """Forward process at respaced step i: sqrt(abar_i) x0 + sqrt(1 - abar_i) noise (for training)."""
        abar = self.gather(self.alphas_cumprod, t_index, x0.dim())
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
