"""The IGDS sampler: one reverse loop for every backend; a backend swaps the step, never the loop.

One guided reverse step at respaced index i (IGDS_SPEC section 3), shapes [B, C, H, W]:

    eps, v   = UNet(x_t, timestep_map[i], y)            (v only for learned-sigma priors)
    x0_hat   = clip(sqrt(1/abar_i) x_t - sqrt(1/abar_i - 1) eps, -1, 1)
    mu       = coef1_i x0_hat + coef2_i x_t
    log s2   = learned-range interpolation of (log beta_i, log beta~_i) by (v + 1) / 2
    g        = dJ(x0_hat, y) / d x0_hat          (mode "x0")   or   dJ / d x_t through the UNet ("xt")
    mu~      = mu + s * exp(log s2) * g           (only inside the guidance window)
    x_{i-1}  = mu~ + [i > 0] exp(log s2 / 2) * n,   n ~ N(0, I) keyed by (image seed, i)

`Sampler.sample(labels, seeds)` runs i = N-1 .. 0 from x_T keyed by each image's seed, so an image
depends only on (seed, label) — never on its batch neighbours — as long as gamma = 0 (the
diversity term deliberately couples the images of one group).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .config import GuidanceConfig
from .diffusion import DiffusionSchedule
from .errors import IGDSInputError
from .guidance import image_guidance, resolve_head
from .profiling import nvtx_range
from .seeding import INITIAL_NOISE_STREAM, seeded_normal

BACKENDS = ("eager", "compiled")
NOISE_SOURCES = ("torch", "philox")


def resolve_noise_source(name: str):
    """noise(seeds [B], stream, shape, device) -> [B, *shape] standard normal, keyed per image.

    "torch": torch generators seeded per (image seed, stream) — the eager default.
    "philox": the counter-based Philox stream the fused Triton update draws in-kernel, so the eager
        path can be given exactly the noise of the fused path.
    """
    if name == "torch":
        return seeded_normal
    if name == "philox":
        from .kernels import philox_normal  # lazily: triton only on this path

        return philox_normal
    raise IGDSInputError(f"unknown noise source {name!r}; expected one of {NOISE_SOURCES}")


@contextlib.contextmanager
def fp32_reference_math(device: torch.device):
    """On CUDA: float32 convolutions and matmuls really in float32, with deterministic cuDNN algorithms.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, and a front end may have
    lowered the matmul precision; the eager reference must not. cudnn.deterministic (with benchmark
    off) fixes the algorithms, so the input-gradient backward of the encoder gives the same bits run
    to run. Settings are restored on exit; a no-op off CUDA (CPU math is float32 and deterministic).
    """
    if torch.device(device).type != "cuda":
        yield
        return
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")  # the high-level API: safe beside either TF32 API
    try:
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False
        ):
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


class EagerStep:
    """The float32 reference step: plain torch, no compile, no graphs, one host sync per step at most.

    Every other backend must reproduce `EagerStep.__call__` within the fidelity tolerances. On CUDA it
    runs under `fp32_reference_math` (no TF32, deterministic cuDNN).
    """

    def __init__(self, sampler: "Sampler"):
        self.sampler = sampler
        self.head = resolve_head(sampler.guidance.head)

    def __call__(self, x, i: int, labels, noise=None, group_ids=None, seeds=None):
        with self.sampler.eager_numerics(x.device):
            return self._call(x, i, labels, noise, group_ids, seeds)

    # The true float32 numerics whatever the sampler's reference_numerics (for fast paths that check
    # themselves against this step).
    reference_math = staticmethod(fp32_reference_math)

    def _call(self, x, i: int, labels, noise, group_ids, seeds):
        s = self.sampler
        if noise is None and seeds is not None and i > 0:
            noise = s.noise_source(seeds, i, x.shape[1:], x.device)
        if not s.batch_invariant or x.shape[0] == 1:
            return self._step(x, i, labels, noise, group_ids)
        # Batch-invariant mode: batched convolutions and GEMMs may pick other algorithms (and so
        # other roundings) for other batch sizes; stepping each image — or each diversity group,
        # which is coupled on purpose — alone makes an image's bytes independent of its batch.
        if s.guidance.gamma != 0.0:
            keys = labels if group_ids is None else group_ids
            members = [(keys == key).nonzero().flatten() for key in torch.unique(keys)]
        else:
            members = [torch.tensor([b], device=x.device) for b in range(x.shape[0])]
        out = torch.empty_like(x)
        for index in members:
            part = self._step(
                x[index], i, labels[index], None if noise is None else noise[index],
                None if group_ids is None else group_ids[index],
            )
            out[index] = part
        return out

    def _step(self, x, i: int, labels, noise, group_ids):
        s = self.sampler
        schedule, cfg = s.schedule, s.guidance
        step = schedule.num_steps - 1 - i
        guided = cfg.guides_step(step)
        timesteps = schedule.timestep_map[i].expand(x.shape[0])
        prior_labels = s.prior_labels(labels)

        if guided and cfg.mode == "xt":
            # Gradient through the UNet: autograd over the whole chain x_t -> eps -> x0_hat -> J.
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                with nvtx_range("igds/unet"):
                    model_output = s.unet(x_in, timesteps, prior_labels)
                eps, v = schedule.split_model_output(model_output, s.channels, s.learn_sigma)
                x0 = schedule.predict_x0(x_in, eps, i, clip=cfg.clip_x0)
                with nvtx_range("igds/guidance"):
                    _, grad = image_guidance(
                        x0, labels, s.ve, cfg.beta, s.tau, cfg.gamma, group_ids, self.head, wrt=x_in
                    )
            x0, v = x0.detach(), (None if v is None else v.detach())
        else:
            with torch.no_grad(), nvtx_range("igds/unet"):
                model_output = s.unet(x, timesteps, prior_labels)
            eps, v = schedule.split_model_output(model_output, s.channels, s.learn_sigma)
            x0 = schedule.predict_x0(x, eps, i, clip=cfg.clip_x0)
            if guided:
                with nvtx_range("igds/guidance"):
                    _, grad = image_guidance(
                        x0, labels, s.ve, cfg.beta, s.tau, cfg.gamma, group_ids, self.head
                    )

        with torch.no_grad(), nvtx_range("igds/update"):
            if guided and cfg.check_finite:
                s.check_finite_gradient(grad, step, labels)
            return self.update(x, x0, v, i, grad if guided else None, noise)

    def update(self, x, x0, v, i: int, grad=None, noise=None):
        """x_{i-1} = posterior mean (+ scale * variance * grad) (+ std * noise, i > 0); grad None = unguided."""
        schedule = self.sampler.schedule
        mean = schedule.posterior_mean(x0, x, i)
        log_variance = schedule.log_variance(x, i, v)
        if grad is not None:
            mean = mean + self.sampler.guidance.scale * torch.exp(log_variance) * grad
        if i == 0 or noise is None:
            return mean
        return mean + torch.exp(0.5 * log_variance) * noise


class Sampler:
    """Guided DDPM sampling with a diffusion prior and a variational estimator.

    unet: callable (x [B,C,H,W], original timesteps [B], y [B] or None) -> [B, C or 2C, H, W], with
        attributes image_size, in_channels, learn_sigma, num_classes (None = unconditional).
    schedule: DiffusionSchedule on the sampling device.
    ve: VariationalEstimator (features(x), weight, bias, log_centroids, tau, num_classes).
    guidance: GuidanceConfig.
    prior_class_map: VE class index -> prior class index, when the VE covers a subset of the prior's
        classes (e.g. ImageWoof's 10 classes of an ImageNet-1K ADM). None = identical class indices.
    batch_invariant: (eager) step each image — each diversity group when gamma != 0 — on its own,
        so an image's bytes do not depend on its batch (batched kernels may round differently for
        other batch sizes). Slower; what byte-identical outputs across world and batch sizes need.
    noise: "torch" or "philox" (see `resolve_noise_source`): x_T and every step's noise. None =
        "philox" when the step draws its noise in-kernel (use_kernels, compiled), else "torch".
    use_kernels: run the guidance head and the DDPM update through the fused Triton kernels
        (`igds_fast.fused_step.FusedStep`); the loop and the result stay those of the eager step.
    reference_numerics: (eager steps, CUDA) run under `fp32_reference_math` — float32 without TF32,
        deterministic cuDNN — as the reference must; False = PyTorch's defaults (TF32 convolutions,
        cudnn.benchmark as set): what bench/sampler.py times as the plain-PyTorch baseline.
    backend: "eager" (float32 reference: no compile, no graphs) or "compiled"
        (`igds_fast.compiled.CompiledStep`: low-precision compiled UNet, CUDA-graph-captured step),
        configured by `backend_options` (a `igds_fast.compiled.CompileConfig` or its fields as a dict).
    """

    def __init__(
        self,
        unet,
        schedule: DiffusionSchedule,
        ve,
        guidance: GuidanceConfig = GuidanceConfig(),
        backend: str = "eager",
        prior_class_map: Sequence[int] | None = None,
        noise: str | None = None,
        use_kernels: bool = False,
        backend_options=None,
        batch_invariant: bool = False,
        reference_numerics: bool = True,
    ):
        if backend not in BACKENDS:
            raise IGDSInputError(f"unknown backend {backend!r}; available: {BACKENDS}")
        if not isinstance(guidance, GuidanceConfig):
            raise IGDSInputError(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        self.unet, self.schedule, self.ve, self.guidance = unet, schedule, ve, guidance
        self.backend = backend
        self.batch_invariant = bool(batch_invariant)
        if not isinstance(reference_numerics, bool):
            raise IGDSInputError(f"reference_numerics must be True or False, got {reference_numerics!r}")
        self.reference_numerics = reference_numerics
        if self.batch_invariant and (backend != "eager" or use_kernels):
            raise IGDSInputError("batch_invariant applies to the eager backend without kernels only")
        self.channels = int(unet.in_channels)
        self.image_size = int(unet.image_size)
        self.learn_sigma = bool(unet.learn_sigma)
        self.num_classes = int(ve.num_classes)
        self.tau = float(guidance.tau if guidance.tau is not None else ve.tau)
        self.device = schedule.device
        self._class_map = self._build_class_map(prior_class_map)
        encoder_channels = len(ve.preprocess.mean)
        if encoder_channels != self.channels:
            raise IGDSInputError(
                f"the VE encoder reads {encoder_channels}-channel images but the prior makes {self.channels}"
            )
        in_kernel_noise = use_kernels or backend == "compiled"
        if noise is None:
            noise = "philox" if in_kernel_noise else "torch"
        elif in_kernel_noise and noise != "philox":
            raise IGDSInputError(f"noise={noise!r} cannot be used with fused kernels: they draw Philox noise in-kernel")
        self.noise_source = resolve_noise_source(noise)
        if backend == "compiled":
            from .compiled import CompiledStep  # lazily: compile machinery only on this path

            self._step = CompiledStep(self, backend_options, reference=EagerStep(self))
        elif backend_options is not None:
            raise IGDSInputError("backend_options apply to the 'compiled' backend only")
        elif use_kernels:
            from .fused_step import FusedStep

            self._step = FusedStep(self)
        else:
            self._step = EagerStep(self)

    def _build_class_map(self, prior_class_map):
        prior_classes = getattr(self.unet, "num_classes", None)
        if prior_class_map is None:
            if prior_classes is not None and prior_classes != self.num_classes:
                raise IGDSInputError(
                    f"the VE has {self.num_classes} classes but the prior has {prior_classes}; "
                    "pass prior_class_map (VE class -> prior class)"
                )
            return None
        mapping = [int(c) for c in prior_class_map]
        if len(mapping) != self.num_classes:
            raise IGDSInputError(
                f"prior_class_map has {len(mapping)} entries but the VE has {self.num_classes} classes"
            )
        if prior_classes is not None and any(not 0 <= c < prior_classes for c in mapping):
            raise IGDSInputError(f"prior_class_map has entries outside [0, {prior_classes})")
        return torch.tensor(mapping, dtype=torch.long, device=self.device)

    def eager_numerics(self, device):
        """The numerics context of the eager steps (`reference_numerics`)."""
        return fp32_reference_math(device) if self.reference_numerics else contextlib.nullcontext()

    def prior_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The labels the UNet is conditioned on (None for an unconditional prior)."""
        if getattr(self.unet, "num_classes", None) is None:
            return None
        return labels if self._class_map is None else self._class_map[labels]

    # ---- the seam every backend implements ------------------------------------------------------
    def step(self, x, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor:
        """One reverse step x_i -> x_{i-1} at respaced index i (N-1 .. 0).

        noise: [B, C, H, W] to add (None with seeds = draw it from the noise source keyed by
        (seeds[b], i); None without seeds = no noise, the posterior mean).
        """
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise IGDSInputError(f"images must be [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        return self._step(x, i, labels, noise, group_ids, seeds)

    @property
    def preferred_batch_size(self) -> int | None:
        """The backend's own batch size (compiled: given, or chosen from free device memory), else None."""
        return getattr(self._step, "batch_size", None)

    def sample(self, labels, seeds, group_ids=None, pad_to: int | None = None) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] for VE class `labels` [B], each keyed by its seed [B].

        pad_to: run the batch at this size (>= B) and return its first B images. Static-shape backends
        (compiled: one compile and one CUDA graph per batch shape) reuse the graphs of their full
        batches for a short last batch instead of capturing new ones. The filler rows repeat the last
        image's label and seed and sit in diversity groups of their own, so they change no real
        image's guidance (with gamma = 0 the images are independent anyway).
        """
        labels, seeds, group_ids = self._validate_batch(labels, seeds, group_ids)
        count = labels.numel()
        if group_ids is None and self.guidance.gamma != 0:
            # The head's default groups made explicit: padded and unpadded batches then have the same
            # kind of batch (one set of static buffers and graphs in the compiled backend).
            group_ids = labels
        if pad_to is not None:
            if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < count:
                raise IGDSInputError(f"pad_to must be an integer >= the batch size {count}, got {pad_to!r}")
            labels, seeds, group_ids = _pad_batch(labels, seeds, group_ids, pad_to)
        shape = (self.channels, self.image_size, self.image_size)
        x = self.noise_source(seeds, INITIAL_NOISE_STREAM, shape, self.device)
        begin_batch = getattr(self._step, "begin_batch", None)
        if begin_batch is not None:  # backends with static buffers set the batch up once, not per step
            x = begin_batch(x, labels, seeds, group_ids)
        for i in reversed(range(self.schedule.num_steps)):
            x = self.step(x, i, labels, None, group_ids, seeds)
        return x[:count].clamp(-1.0, 1.0)

    # ---- validation ---------------------------------------------------------------------------
    def _validate_batch(self, labels, seeds, group_ids):
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
        if labels.numel() == 0:
            raise IGDSInputError("no labels to sample")
        if len(seeds) != labels.numel():
            raise IGDSInputError(f"got {labels.numel()} labels but {len(seeds)} seeds")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise IGDSInputError(
                f"labels outside [0, {self.num_classes}): {sorted(set(bad.tolist()))[:10]}"
            )
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids, dtype=torch.long, device=self.device).reshape(-1)
            if group_ids.numel() != labels.numel():
                raise IGDSInputError(f"got {labels.numel()} labels but {group_ids.numel()} group ids")
        return labels.to(self.device), seeds, group_ids

    def check_finite_gradient(self, grad: torch.Tensor, step: int, labels: torch.Tensor) -> None:
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = sorted(set(labels[~finite].tolist()))
            raise IGDSInputError(
                f"non-finite guidance gradient at sampling step {step} "
                f"(respaced index {self.schedule.num_steps - 1 - step}) for labels {bad[:10]}"
            )


def _pad_batch(labels: torch.Tensor, seeds: list[int], group_ids, size: int):
    """(labels, seeds, group_ids) grown to `size` rows by repeating the last image (see Sampler.sample).

    With diversity groups (given, or the labels when gamma != 0), every filler gets a group id of its
    own below every real one, so the InfoNCE sums of the real images never see a filler; a singleton
    group's term has zero gradient. Without groups (gamma = 0) nothing couples the images.
    """
    extra = size - labels.numel()
    if extra == 0:
        return labels, seeds, group_ids
    labels = torch.cat([labels, labels[-1:].expand(extra)])
    seeds = seeds + [seeds[-1]] * extra
    if group_ids is not None:
        lowest = int(group_ids.min())  # one host read per batch, before the loop
        fillers = torch.arange(lowest - extra, lowest, device=group_ids.device)
        group_ids = torch.cat([group_ids, fillers])
    return labels, seeds, group_ids
