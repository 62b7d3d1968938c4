"""The IGDS sampler: one reverse loop for every backend; a backend swaps the step, never the loop.

`Sampler.sample(labels, seeds)` runs i = N-1 .. 0 from x_T keyed by each image's seed (the step
itself: sampling/step.py), so an image depends only on (seed, label) — never on its batch
neighbours — as long as gamma = 0 (the diversity term deliberately couples the images of one group).
The loop, for every backend, drives the backend's stepper (`Sampler.stepper`, sampling.backends.Stepper):

    x, batch = stepper.begin_batch(x_T, labels, seeds, group_ids)    once per batch
    x = stepper.advance(x, i, batch)                                  i = N-1 .. 0, no host sync
    stepper.finish_batch(batch)                                       the one host read (finite check)

inside `stepper.numerics()` (the eager reference's float32 settings on CUDA, entered once per batch).
Its body is written once, in `SamplingRun` (`Sampler.batch`): `sample` runs it to the end, and the
benchmarks and profilers step it one reverse step at a time. Every step runs inside an NVTX range `igds/step/<k>`, k the loop iteration (0 = the first step from
noise), the index `IGDS_PROFILE_STEPS=A:B` names: the first batch in the process opens the CUDA
profiler around steps A .. B-1 (profiling/window.py), so `profiling/nsys.sh` captures a real run's
steady state. `on_steps_done` reports finished steps as the device finishes them, read from CUDA
events (`Event.query`, never a wait), so a progress bar moves within a batch without a host sync.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import deque
from typing import Callable, Sequence

import torch

from ..diffusion import DiffusionSchedule, resolve_eta
from ..errors import IGDSInputError
from ..guidance import GuidanceConfig, IGDSGuidance
from ..models.protocols import as_prior, check_estimator
from ..profiling import nvtx_range
from ..profiling.window import (
    PROFILE_STEPS_ENV,
    ProfilerWindow,
    claim_process_window,
    resolve_step_window,
)
from ..seeding import INITIAL_NOISE_STREAM
from .backends import Stepper, build_step, default_noise, resolve_noise_source
from .step import StepContext

DECODE_CHUNK = 8  # latents decoded at once by Sampler.decode (the decoder's activations are large)


class Sampler:
    """Guided DDPM or DDIM sampling with a diffusion prior and a variational estimator.

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
    noise: "torch" or "philox" (see `sampling.backends.resolve_noise_source`): x_T and every step's
        noise. None = "philox" when the step draws its noise in-kernel (fused, compiled), else "torch".
    use_kernels: deprecated spelling of backend="fused" (a DeprecationWarning).
    reference_numerics: (eager backend, CUDA) run under `fp32_reference_math` — float32 without TF32,
        deterministic cuDNN — as the reference must; False = PyTorch's defaults (TF32 convolutions,
        cudnn.benchmark as set): what bench/sampler.py times as the plain-PyTorch baseline.
    decoder: a latent prior's decoder (models.vae.LatentDecoder: z -> image, differentiable; with
        in_channels = the prior's, out_channels = the VE's): the guidance decodes every x0 prediction
        before the VE sees it (the gradient flows back through it), and `sample` returns decoded
        images. None = the prior's samples are images.
    backend: one of `sampling.backends.BACKENDS`: "eager" (float32 reference: no compile, no graphs),
        "fused" (`sampling.fused.FusedStep`: the eager step with the guidance head and the DDPM update
        on the fused Triton kernels; the UNet stays eager) or "compiled"
        (`sampling.compiled.CompiledStep`: low-precision compiled UNet, CUDA-graph-captured step),
        configured by `backend_options` (a `CompileConfig` or its fields as a dict).
    profile_steps: "A:B" (or (A, B)): open the CUDA profiler around loop steps A .. B-1 (0 = the first
        step from noise, B excluded) of the first batch sampled in this process (profiling/window.py;
        a no-op without CUDA). None = $IGDS_PROFILE_STEPS, if set; both set and different is refused.
    sampler: "ddpm" (ancestral steps through the posterior, the paper's) or "ddim" (guided-diffusion's
        `ddim_sample`: the guidance shifts the predicted noise, sampling/step.py); eta: DDIM's noise
        (0 = deterministic, the default; 1 = DDPM's posterior variance), refused with "ddpm". Every
        backend runs either; the noise of eta > 0 is keyed by (seed, step) as DDPM's.

    Attributes: guidance (the GuidanceConfig), guidance_fn (the eager IGDSGuidance), context (what
    every step reads), backend (its name), stepper (the backend's step object), self_check_report,
    tau, channels, image_size, learn_sigma, num_classes, device, noise_source, decoder (or None),
    profile_window (the StepWindow to profile, or None), sampler, eta (None for DDPM).
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
        decoder=None,
        profile_steps=None,
        sampler: str = "ddpm",
        eta: float | None = None,
    ):
        if not isinstance(guidance, GuidanceConfig):
            raise IGDSInputError(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        if not isinstance(reference_numerics, bool):
            raise IGDSInputError(f"reference_numerics must be True or False, got {reference_numerics!r}")
        if use_kernels:
            backend = _fused_from_use_kernels(backend)
        self.eta = resolve_eta(sampler, eta)  # one-line errors: an unknown sampler, eta with DDPM, eta outside [0, 1]
        self.sampler = sampler
        unet = as_prior(unet)  # guided-diffusion's UNetModel as it is (models.protocols)
        self.unet, self.schedule, self.ve, self.guidance = unet, schedule, ve, guidance
        self.backend = backend
        self.channels = int(unet.in_channels)
        self.image_size = int(unet.image_size)
        self.learn_sigma = bool(unet.learn_sigma)
        self.decoder = decoder
        if decoder is not None and guidance.clip_x0:
            raise IGDSInputError("clip_x0=True would clip latents to [-1, 1]: a latent prior samples without clipping "
                                 "(DiT's clip_denoised=False); pass GuidanceConfig(clip_x0=False)")
        self.batch_invariant = bool(batch_invariant)
        check_estimator(ve, self.channels if decoder is None else _decoder_out_channels(decoder, self.channels))
        self.num_classes = int(ve.num_classes)
        self.device = schedule.device
        self.profile_window = resolve_step_window(profile_steps, schedule.num_steps,
                                                  "profile_steps" if profile_steps is not None else PROFILE_STEPS_ENV)
        self.guidance_fn = IGDSGuidance.from_config(ve, guidance, decoder=decoder)
        self.tau = self.guidance_fn.tau
        noise = default_noise(backend, noise)
        self.noise_source, noise_keys = resolve_noise_source(noise)
        self.context = StepContext(
            unet=unet, schedule=schedule, guidance_config=guidance, guidance=self.guidance_fn, channels=self.channels,
            image_size=self.image_size, learn_sigma=self.learn_sigma, class_map=self._build_class_map(prior_class_map),
            conditional=getattr(unet, "num_classes", None) is not None, noise=noise, noise_source=self.noise_source,
            noise_keys=noise_keys, device=self.device, reference_numerics=reference_numerics, sampler=sampler,
            ddim=None if self.eta is None else schedule.ddim(self.eta),
        )
        self._stepper = build_step(self.context, backend, batch_invariant, backend_options)

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

    def numerics(self):
        """The numerics context of this sampler's steps (see `reference_numerics`)."""
        return self._stepper.numerics()

    def prior_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The labels the UNet is conditioned on (None for an unconditional prior)."""
        return self.context.prior_labels(labels)

    # ---- steps ---------------------------------------------------------------------------------------
    def step(self, x, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor:
        """One reverse step x_i -> x_{i-1} at respaced index i (N-1 .. 0), on its own.

        noise: [B, C, H, W] to add (None with seeds = draw it from the noise source keyed by
        (seeds[b], i); None without seeds = no noise, the posterior mean). A non-finite guidance
        gradient is raised by this call (eager, fused) or by the call at i = 0 (compiled).
        """
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise IGDSInputError(f"images must be [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        if group_ids is not None:
            group_ids = torch.as_tensor(group_ids, dtype=torch.long, device=self.device).reshape(-1)
        return self._stepper(x, i, labels, noise, group_ids, seeds)

    @property
    def stepper(self) -> Stepper:
        """The backend's step object (EagerStep, FusedStep or CompiledStep; its surface: backends.Stepper).

        The loop that drives it is `batch` / `sample`; use it for what a backend exposes beyond that
        (the compiled backend's copies, graphs and configuration).
        """
        return self._stepper

    @property
    def self_check_report(self) -> dict | None:
        """The compiled backend's passed first-step self-check report (see backends.Stepper), else None."""
        return self._stepper.self_check_report

    @property
    def preferred_batch_size(self) -> int | None:
        """The backend's own batch size (compiled: given, or chosen from free device memory), else None."""
        return self._stepper.batch_size

    def sample(self, labels, seeds, group_ids=None, pad_to: int | None = None, x_T: torch.Tensor | None = None,
               callback=None, trace: bool = False, decode: bool = True,
               on_steps_done: Callable[[int, int], None] | None = None):
        """Images [B, C, H, W] in [-1, 1] for VE class `labels` [B], each keyed by its seed [B].

        With a decoder (a latent prior) the loop runs on latents [B, C, S, S] and the result is their
        decoded images [B, C', H', W'] clamped to [-1, 1] (`decode`); decode=False returns the final
        latents themselves (not clamped). x_T, the callback's x and x0 are latents then.

        pad_to: run the batch at this size (>= B) and return its first B images. Static-shape backends
        (compiled: one compile and one CUDA graph per batch shape) reuse the graphs of their full
        batches for a short last batch instead of capturing new ones. The filler rows repeat the last
        image's label and seed and sit in diversity groups of their own, so they change no real
        image's guidance (with gamma = 0 the images are independent anyway).
        x_T: the initial noise [B, C, H, W] (None: drawn from each image's seed); the step noise still
            comes from the seeds.
        callback: called after every step as callback(i, timestep, x, x0) — i the respaced index (N-1
            .. 0), timestep the training step it samples, x = x_{i-1} [B, C, H, W] and x0 = the step's
            x0 prediction [B, C, H, W] (views: clone to keep) — as diffusers' callback_on_step_end; a
            returned tensor replaces x. It reads the device at every step: for inspection, not speed.
        trace: also return the guidance terms of every guided step (sampling.step.TRACE_TERMS), kept
            on the device and read once after the last step: (images, {term: [N, B]}) (row i =
            respaced index i; NaN where a step is not guided).
        on_steps_done: called as on_steps_done(finished, num_steps) when the device has finished
            `finished` of the batch's steps (1 .. num_steps; non-decreasing, not necessarily every
            value): on CUDA read from an event recorded after each step and queried (never waited
            on) before the next, so it never synchronises and may report late; on CPU after every
            step. The last call, (num_steps, num_steps), comes once the loop's results are read.
        """
        if not isinstance(decode, bool):
            raise IGDSInputError(f"decode must be True or False, got {decode!r}")
        if not decode and self.decoder is None:
            raise IGDSInputError("decode=False applies to a latent prior (a Sampler with a decoder) only")
        with self.batch(labels, seeds, group_ids, pad_to, x_T, trace, callback, on_steps_done) as run:
            while run.remaining:
                run.step()
            run.finish()
        x = run.x
        if self.decoder is None:
            images = x.clamp(-1.0, 1.0)
        else:
            images = self.decode(x) if decode else x.clone()  # x may be a static buffer
        if not trace:
            return images
        return images, run.read_trace()

    def batch(self, labels, seeds, group_ids=None, pad_to: int | None = None, x_T: torch.Tensor | None = None,
              trace: bool = False, callback=None,
              on_steps_done: Callable[[int, int], None] | None = None) -> SamplingRun:
        """One batch of the reverse loop, stepped by the caller: `sample`'s loop, one step at a time.

            with sampler.batch(labels, seeds) as run:     x_T, numerics, the batch bound to the stepper
                while run.remaining:
                    run.step()                            one reverse step (i = N-1 .. 0)
                run.finish()                              the batch's finite check (one host read)
            images = run.x.clamp(-1, 1)

        The arguments are `sample`'s (checked here, before anything runs); the SamplingRun is the
        loop (see there). For benchmarks and profilers that time or trace single steps of a real run.
        """
        labels, seeds, group_ids = self._validate_batch(labels, seeds, group_ids)
        count = labels.numel()
        if callback is not None and not callable(callback):
            raise IGDSInputError(f"callback must be callable, got {type(callback).__name__}")
        if on_steps_done is not None and not callable(on_steps_done):
            raise IGDSInputError(f"on_steps_done must be callable, got {type(on_steps_done).__name__}")
        shape = (self.channels, self.image_size, self.image_size)
        if x_T is not None:
            if not torch.is_tensor(x_T) or tuple(x_T.shape) != (count, *shape):
                raise IGDSInputError(f"x_T must be a tensor of shape {(count, *shape)}, got "
                                     f"{tuple(x_T.shape) if torch.is_tensor(x_T) else type(x_T).__name__}")
            x_T = x_T.to(self.device, torch.float32)
        if group_ids is None and self.guidance.gamma != 0:
            # The head's default groups made explicit: padded and unpadded batches then have the same
            # kind of batch (one set of static buffers and graphs in the compiled backend).
            group_ids = labels
        if pad_to is not None:
            if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < count:
                raise IGDSInputError(f"pad_to must be an integer >= the batch size {count}, got {pad_to!r}")
            labels, seeds, group_ids = _pad_batch(labels, seeds, group_ids, pad_to)
            if x_T is not None:
                x_T = torch.cat([x_T, x_T[-1:].expand(pad_to - count, *shape)])
        return SamplingRun(self, labels, seeds, group_ids, x_T, count, bool(trace), callback, on_steps_done)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, C', H', W'] in [-1, 1] of latents [B, C, S, S]: the float32 decoder, in chunks.

        Always the user's float32 decoder under the sampler's numerics (one decode per image is 1/N of
        the guided decodes a run makes: not worth a second precision); DECODE_CHUNK images at a time,
        one at a time when batch_invariant (an image's bytes then do not depend on its batch).
        """
        if self.decoder is None:
            raise IGDSInputError("this sampler has no decoder: its samples are images already")
        chunk = 1 if self.batch_invariant else DECODE_CHUNK
        with torch.no_grad(), self._stepper.numerics():
            parts = [self.decoder(latents[start:start + chunk].to(self.device, torch.float32))
                     for start in range(0, latents.shape[0], chunk)]
        return torch.cat(parts).clamp(-1.0, 1.0)

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


class SamplingRun:
    """One batch of a Sampler's reverse loop (`Sampler.batch`): the loop body, written once.

    `with run:` claims the process's profiler window (IGDS_PROFILE_STEPS, the first batch only),
    enters the backend's numerics (once per batch), takes x_T (given, or drawn from each image's
    seed) and binds the batch to the stepper (`begin_batch`). `step()` runs the next reverse step;
    `finish()`, after the last one, reads the batch's non-finite check. Leaving the block closes the
    profiler window (an error inside it still ends the capture) and the numerics.

    count: the real images (the rest of a padded batch are fillers); num_steps: N; remaining: the
    steps still to run; x: the real images' current x_t [count, C, H, W] (a view of the stepper's x —
    the compiled backend's static buffer: clone to keep).
    """

    def __init__(self, sampler: Sampler, labels, seeds, group_ids, x_T, count: int, trace: bool, callback,
                 on_steps_done):
        self._sampler, self._stepper = sampler, sampler._stepper
        self._labels, self._seeds, self._group_ids, self._x_T = labels, seeds, group_ids, x_T
        self.count, self.num_steps, self.trace = count, sampler.schedule.num_steps, trace
        self._callback, self._on_steps_done = callback, on_steps_done
        self._x: torch.Tensor | None = None
        self._batch = None  # what the stepper's begin_batch returned
        self._done = 0  # steps run; the next one is loop step k = _done, respaced index N-1-k
        self._exit: contextlib.ExitStack | None = None  # open while inside the with block
        self._window: ProfilerWindow | None = None
        self._watch: _StepWatch | None = None

    def __enter__(self) -> SamplingRun:
        if self._x is not None:
            raise IGDSInputError("a SamplingRun runs once: call sampler.batch(...) for the next batch")
        sampler = self._sampler
        with contextlib.ExitStack() as stack:  # undone at once if the set-up fails
            if sampler.profile_window is not None and claim_process_window():  # the process's first batch only
                self._window = ProfilerWindow(sampler.profile_window, sampler.device)
                stack.callback(self._window.close)
            if self._on_steps_done is not None:
                self._watch = _StepWatch(self._on_steps_done, self.num_steps, sampler.device)
            stack.enter_context(self._stepper.numerics())
            shape = (sampler.channels, sampler.image_size, sampler.image_size)
            x = self._x_T
            if x is None:
                x = sampler.noise_source(self._seeds, INITIAL_NOISE_STREAM, shape, sampler.device)
            self._x, self._batch = self._stepper.begin_batch(x, self._labels, self._seeds, self._group_ids,
                                                             trace=self.trace)
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *exc_info):
        exit_stack, self._exit = self._exit, None
        return exit_stack.__exit__(*exc_info)

    @property
    def remaining(self) -> int:
        return self.num_steps - self._done

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            raise IGDSInputError("the run has no x before `with sampler.batch(...) as run:` is entered")
        return self._x if self._x.shape[0] == self.count else self._x[: self.count]

    def step(self) -> int:
        """Run the next reverse step; returns its respaced index i (N-1 first, 0 last).

        Loop step k (0 = the first step from noise) runs inside the NVTX / torch.profiler range
        igds/step/<k>, between the profiler window's hooks; then the callback (if any) and the step
        watch (on_steps_done). No host synchronisation but the callback's own.
        """
        if self._exit is None:
            raise IGDSInputError("SamplingRun.step() runs inside `with sampler.batch(...) as run:`")
        k = self._done
        if k == self.num_steps:
            raise IGDSInputError(f"all {self.num_steps} steps of this batch have run")
        i = self.num_steps - 1 - k
        window, callback = self._window, self._callback
        if window is not None:
            window.before_step(k)
        before = self._x.clone() if callback is not None else None  # the compiled step updates x in place
        with nvtx_range(f"igds/step/{k}"):
            self._x = self._stepper.advance(self._x, i, self._batch)
        if callback is not None:
            self._call_back(callback, i, before)
        if window is not None:
            window.after_step(k)
        if self._watch is not None:
            self._watch.issued(k + 1)
        self._done = k + 1
        return i

    def finish(self) -> None:
        """After the last step: raise the batch's non-finite-gradient error, if any (its one host
        read), then report every step done to on_steps_done."""
        if self._exit is None:
            raise IGDSInputError("SamplingRun.finish() runs inside `with sampler.batch(...) as run:`")
        if self._done != self.num_steps:
            raise IGDSInputError(f"finish() comes after the batch's last step: {self.remaining} of "
                                 f"{self.num_steps} steps have not run")
        self._stepper.finish_batch(self._batch)
        if self._watch is not None:
            self._watch.finished()

    def read_trace(self) -> dict[str, torch.Tensor]:
        """{term: [N, count]} of a traced batch (sampling.step.TRACE_TERMS; row i = respaced index i,
        NaN where a step is not guided): one host read, after the steps."""
        if not self.trace or self._batch is None:
            raise IGDSInputError("read_trace() needs a run entered with sampler.batch(..., trace=True)")
        return {name: values[:, : self.count] for name, values in self._batch.trace.read().items()}

    def _call_back(self, callback, i: int, before: torch.Tensor) -> None:
        """Run a per-step callback on (i, timestep, x_{i-1}, x0_hat); copy a returned replacement into x."""
        sampler, count, x = self._sampler, self.count, self._x
        eps, _ = sampler.schedule.split_model_output(self._stepper.last_model_output, sampler.channels,
                                                     sampler.learn_sigma)
        x0 = sampler.schedule.predict_x0(before, eps, i, clip=sampler.guidance.clip_x0)
        replacement = callback(i, int(sampler.schedule.timestep_map[i]), x[:count], x0[:count])
        if replacement is not None:
            if not torch.is_tensor(replacement) or replacement.shape != x[:count].shape:
                raise IGDSInputError(f"the callback must return None or a tensor of shape {tuple(x[:count].shape)}")
            x[:count].copy_(replacement)  # in place: the compiled backend's x is its static buffer


class _StepWatch:
    """Reports how many steps of a batch the device has finished, without ever waiting for it.

    CUDA: an event recorded on the device's current stream after each issued step; before the next
    one, the events that have completed (`Event.query`, non-blocking) are taken in order and the
    newest reported. Elsewhere a step has finished when its call returns.
    """

    def __init__(self, report: Callable[[int, int], None], num_steps: int, device):
        self.report, self.num_steps = report, num_steps
        self.device = torch.device(device)
        self.pending: deque | None = deque() if self.device.type == "cuda" else None
        self.reported = 0

    def issued(self, steps: int) -> None:
        if self.pending is None:
            self._tell(steps)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.pending.append((steps, event))
        finished = None
        while self.pending and self.pending[0][1].query():
            finished = self.pending.popleft()[0]
        if finished is not None:
            self._tell(finished)

    def finished(self) -> None:
        """The batch's results are on the host (its finite check read them): every step is done."""
        if self.pending is not None:
            self.pending.clear()
        self._tell(self.num_steps)

    def _tell(self, steps: int) -> None:
        if steps > self.reported:
            self.reported = steps
            self.report(steps, self.num_steps)


def _fused_from_use_kernels(backend: str) -> str:
    """backend="fused" for the deprecated use_kernels=True (which named no backend of its own)."""
    warnings.warn('Sampler(use_kernels=True) is deprecated: pass backend="fused"', DeprecationWarning, stacklevel=3)
    if backend not in ("eager", "fused"):
        raise IGDSInputError(f'use_kernels=True (deprecated: backend="fused") cannot be combined with backend={backend!r}')
    return "fused"


def _decoder_out_channels(decoder, prior_channels: int) -> int:
    """The decoder's image channels, after checking it fits the prior (one-line errors)."""
    if not callable(decoder):
        raise IGDSInputError(f"the decoder must be callable as decoder(z), got {type(decoder).__name__}")
    missing = [name for name in ("in_channels", "out_channels") if not hasattr(decoder, name)]
    if missing:
        raise IGDSInputError(f"the decoder {type(decoder).__name__} lacks {', '.join(missing)} "
                             "(models.vae.LatentDecoder has them)")
    if int(decoder.in_channels) != prior_channels:
        raise IGDSInputError(f"the decoder reads {decoder.in_channels}-channel latents but the prior makes "
                             f"{prior_channels}")
    return int(decoder.out_channels)


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


__all__ = ["Sampler", "SamplingRun"]
