"""The compiled backend: a low-precision, torch.compile'd reverse step, captured once in a CUDA graph.

`Sampler(..., backend="compiled", backend_options=CompileConfig(...) or a dict of its fields)` runs
`CompiledStep`: the one `reverse_step` on `KernelOps` whose UNet and encoder are low-precision
compiled copies. One guided reverse step (x0 mode), shapes [B, C, H, W] unless noted:

    model_output = UNet_lp(x_t, timestep_map[i], y)    compiled, dtype bf16/fp16, channels_last,
                                                       GroupNorm statistics in fp32 (ADM's GroupNorm32),
                                                       attention softmax in fp32 (fused SDPA
                                                       kernels keep fp32 statistics)  [B, 2C or C, H, W] fp32
    x0_hat       = predict_x0 Triton kernel (x_t, eps)                                 fp32
    z            = f_lp(preprocess(x0_hat))            compiled encoder forward        [B, d] fp32 out
    dJ/dz        = guidance_head Triton kernel         (fp32)                          [B, d]
    g            = dJ/dx0_hat by autograd through f_lp (compiled AOTAutograd backward) fp32
    x_{i-1}      = fused_ddpm_update Triton kernel, Philox noise in-kernel, written in place into x_t

Guidance mode "xt" differentiates through the UNet instead (x0 then comes from torch ops so autograd
sees it); everything else is the same.

Static buffers and graphs. Each batch shape owns device buffers: x (x_t in, x_{t-1} out, in place),
labels, seeds (per-image Philox keys), group ids, the step index (0-d int64) and a per-image
non-finite tracker. `begin_batch` copies a batch into them once; each step copies the step index
device-to-device from a table built once and replays the CUDA graph of
(guided or not, noise kind), captured the first time that pair is met for this batch shape (after a
warm-up on a side stream — torch.cuda.graphs' recipe; the warm-up also triggers torch.compile and
its AOTAutograd backward, and restores x_t so it never advances the batch). Graphs are reused by
every later batch of the same shape. Inside the 250-step loop nothing synchronises with the host:
`GuidanceConfig.check_finite` is honoured by recording, on the device, the latest respaced index at
which each image's guidance gradient was non-finite, read ONCE after the last step (i = 0), which
then raises the same IGDSInputError as the eager step, naming the earliest bad sampling step.

The returned x_{t-1} IS the static buffer: it stays valid until the next step of this backend
(`Sampler.sample` clamps it into a fresh tensor at the end; clone it to keep an intermediate).

Precision. The user's float32 UNet and VE are never modified: the backend runs on low-precision
deep copies (parameters cast while copying, so no second float32 copy is ever made). `eager` stays
the float32 reference. dtype "fp32" is allowed too (CPU testing and debugging: the compile machinery
without the bf16 rounding; bf16 convolutions on CPU are slow).

Without CUDA: no graphs (forced off); torch.compile still runs (inductor's C++ backend, mode
"default", or backend="aot_eager" — dynamo + AOTAutograd without code generation, the cheap mode
the CPU tests use); the Triton kernels run in Triton's interpreter, which must be selected before
triton is first imported (importing igds_fast.kernels sets TRITON_INTERPRET=1 on a machine without
CUDA when triton is not imported yet; otherwise the step fails with an IGDSInputError that says so).

TensorRT: with CompileConfig.unet_engine the UNet runs on a TensorRT engine built by
`igds-fast export-unet --engine` (sampling/compiled/tensorrt.py) instead of torch.compile; the rest of the
step, and its capture in one CUDA graph, are unchanged.

The guidance head is always the Triton `guidance_head` (GuidanceConfig.head is ignored), as in
`sampling.fused.FusedStep`, whose operations (`KernelOps`) this backend runs. The first step of a
run checks itself against the eager float32 step (`self_check.py`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from ...errors import IGDSInputError
# Importing the kernels selects Triton's interpreter on a machine without CUDA (see igds_fast.kernels).
from ...kernels import StepTables, philox_normal, predict_x0, seeds_to_tensor
from ...kernels._common import on_device
from ...profiling import nvtx_range
from ..backends import check_triton_runs_on
from ..eager import fp32_reference_math
from ..fused import KernelOps
from ..step import GuidanceTrace, NonFiniteTracker, StepContext, StepInputs, StepOps, reverse_step
from .attention import resolve_attention
from .config import DTYPES, CompileConfig
from .low_precision import LowPrecisionFeatures, LowPrecisionUNet, low_precision_copy
from .memory import CPU_BATCH_SIZE, choose_batch_size, estimate_step_memory, graphs_per_batch_shape
from .self_check import SELF_CHECK_TOLERANCES, checked_rows, compare, first_diverging_module, raise_if_failed
from .tensorrt import engine_unet


class _BatchBuffers:
    """Static device buffers of one batch shape; every graph of that shape reads/writes only these.

    x [B, C, H, W] fp32 (x_t in, x_{t-1} out), noise [B, C, H, W] (only for explicitly given noise),
    labels [B] int64, prior_labels [B] int64 (None for an unconditional prior), seeds [B] int64
    (Philox keys; has_seeds False when none were given), group_ids [B] int64 or None, index 0-d
    int64 (respaced step i), tracker (latest respaced index with a non-finite gradient, per image),
    trace (the GuidanceTrace of a traced batch; `tracing` says whether this batch records it).
    """

    def __init__(self, batch: int, image_shape, device, with_groups: bool, conditional: bool):
        self.x = torch.zeros(batch, *image_shape, device=device)
        self.noise: torch.Tensor | None = None
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.prior_labels = torch.zeros(batch, dtype=torch.long, device=device) if conditional else None
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.has_seeds = False
        self.group_ids = torch.zeros(batch, dtype=torch.long, device=device) if with_groups else None
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.tracker = NonFiniteTracker(batch, device)
        self.trace: GuidanceTrace | None = None
        self.tracing = False
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def inputs(self, i: int, noise_kind: str) -> StepInputs:
        return StepInputs(i, self.index, self.labels, self.prior_labels, self.group_ids,
                          self.seeds if noise_kind == "philox" else None, self.noise if noise_kind == "tensor" else None,
                          self.trace if self.tracing else None)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """torch.backends.cudnn.benchmark set for the block only (never left on for the whole process)."""
    if not enabled:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class CompiledStep:
    """The step seam of `Sampler(backend="compiled")`: `CompiledStep(context, backend_options)`.

    begin_batch(x [B,C,H,W], labels [B], seeds, group_ids) -> (the static x holding x_T, its buffers);
    advance(x, i, buffers, noise=None) -> x_{i-1} (the static buffer); finish_batch(buffers) reads the
    non-finite tracker once; __call__(x, i, labels, noise=None, group_ids=None, seeds=None) is one
    step on its own (inputs copied in at every call; the tracker is reset at i = N-1, read at i = 0).
    Attributes: compile_config (CompileConfig resolved for the device), attention ("sdpa"/"xformers"/
    "tensorrt"), use_graphs (bool; the bench flips it to time one compilation with and without
    graphs), unet_lp / features_lp (the low-precision modules; unet_lp is the TensorRTUNet when
    CompileConfig.unet_engine is set), ops (the KernelOps the step runs), last_model_output (fp32 UNet
    output of the latest step, [B, 2C or C, H, W], a static buffer in graph mode), self_check_report.
    """

    def __init__(self, context: StepContext, backend_options=None):
        self.context = context
        self.device = context.device
        self.compile_config = CompileConfig.from_options(backend_options).for_device(self.device)
        cfg = self.compile_config
        _check_triton_runs_here(self.device)
        self.tables = StepTables(context.schedule)  # fp32, contiguous, on the device: built once
        self.step_indices = torch.arange(context.num_steps, dtype=torch.int64, device=self.device)
        self.dtype, self.encoder_dtype = DTYPES[cfg.dtype], DTYPES[cfg.encoder_dtype]
        self.decoder_dtype = DTYPES[cfg.decoder_dtype]

        unet = context.unet
        if not isinstance(unet, nn.Module):
            raise IGDSInputError(f"the compiled backend needs an nn.Module UNet, got {type(unet).__name__}")
        if cfg.unet_engine is not None:
            self.unet_lp = engine_unet(cfg, context)
            self.attention = "tensorrt"
        else:
            self.unet_lp = LowPrecisionUNet(low_precision_copy(unet, self.dtype, cfg.channels_last), self.dtype,
                                            cfg.channels_last)
            self.attention = resolve_attention(cfg.attention, self.unet_lp, context, compiled=cfg.compile)

        ve = context.guidance.ve
        encoder = getattr(ve, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "forward_features"):
            self.features_lp: Callable = LowPrecisionFeatures(
                ve.preprocess, low_precision_copy(encoder, self.encoder_dtype, cfg.channels_last),
                self.encoder_dtype, cfg.channels_last,
            )
        else:  # a duck-typed VE without a ResNet trunk: its own features(), as given
            self.features_lp = ve.features

        decoder = context.guidance.decoder  # a latent prior's VAE decoder, or None
        self.decoder_lp = (low_precision_copy(decoder, self.decoder_dtype, cfg.channels_last)
                           if isinstance(decoder, nn.Module) else decoder)

        unet_fn, features_fn, decoder_fn = self.unet_lp, self.features_lp, self.decoder_lp
        if cfg.compile:
            kwargs = cfg.compile_kwargs()
            if cfg.unet_engine is None:
                unet_fn = torch.compile(self.unet_lp, **kwargs)
            if cfg.compile_encoder:
                features_fn = torch.compile(self.features_lp, **kwargs)
                if isinstance(self.decoder_lp, nn.Module):
                    decoder_fn = torch.compile(self.decoder_lp, **kwargs)
        self.ops = KernelOps(context, self.tables, unet_fn=unet_fn, features=features_fn, out_in_place=True,
                             decoder=decoder_fn)
        self.use_graphs = cfg.cuda_graphs
        self._buffers: dict[tuple[int, bool], _BatchBuffers] = {}
        self._chosen_batch_size: int | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.last_model_output: torch.Tensor | None = None
        self._self_check_pending = cfg.self_check
        self.self_check_report: dict | None = None  # the passed check's measured errors (self_check.py)

    def numerics(self):
        """cuDNN's benchmark mode for this backend's steps only (CompileConfig.cudnn_benchmark, CUDA)."""
        return _cudnn_benchmark(self.device.type == "cuda" and self.compile_config.cudnn_benchmark)

    # ---- the seam -------------------------------------------------------------------------------
    def begin_batch(self, x, labels, seeds, group_ids=None, trace: bool = False):
        """Copy a new batch (x_T, labels, seeds, group ids) into its static buffers: (static x, buffers).

        trace: the guided steps record their guidance terms into the buffers' GuidanceTrace (its own
        graphs: a traced and an untraced batch of one shape replay different graphs).
        """
        with on_device(self.device):
            buffers = self._bind(x, labels, seeds, group_ids, reset=True)
            buffers.tracing = bool(trace)
            if trace:
                if buffers.trace is None:
                    buffers.trace = GuidanceTrace(self.context.num_steps, x.shape[0], self.device)
                buffers.trace.reset()
        return buffers.x, buffers

    def advance(self, x, i: int, buffers: _BatchBuffers, noise=None) -> torch.Tensor:
        """x_{i-1} from x_i = x at respaced index i, within a bound batch (module docstring)."""
        # The sampler's device current for the whole step: Triton launches and the graph capture
        # stream follow the current device, not the tensors' (matters for cuda:N with N != current).
        with on_device(self.device):
            if x is not buffers.x:
                buffers.x.copy_(x)
            if noise is not None:
                if tuple(noise.shape) != tuple(buffers.x.shape):
                    raise IGDSInputError(f"noise must have shape {tuple(buffers.x.shape)}, got {tuple(noise.shape)}")
                if buffers.noise is None:
                    buffers.noise = torch.empty_like(buffers.x)
                buffers.noise.copy_(noise)
                noise_kind = "tensor"
            else:
                noise_kind = "philox" if buffers.has_seeds else "none"
            # The first step of a run is checked against the eager float32 step (once per run).
            checking = self._self_check_pending and i == self.context.num_steps - 1
            x_before = buffers.x.clone() if checking else None
            buffers.index.copy_(self.step_indices[i])  # device-to-device: no host value enters the graph
            if self.use_graphs:
                self.last_model_output = self._replay(buffers, i, noise_kind)
            else:
                with nvtx_range("igds/compiled/step"):
                    self.last_model_output = self._body(buffers, i, noise_kind)
            if checking:
                with nvtx_range("igds/compiled/self_check"):
                    self.self_check_report = self._self_check(buffers, x_before, i, noise_kind)
                self._self_check_pending = False
        return buffers.x

    def finish_batch(self, buffers: _BatchBuffers) -> None:
        """Raise the eager step's error if a guidance gradient of the batch was non-finite (one host read)."""
        if self.context.guidance_config.check_finite:
            buffers.tracker.raise_if_any(buffers.labels, self.context.num_steps)

    def __call__(self, x, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor:
        """One step on its own: the inputs are copied into the static buffers at every call."""
        with on_device(self.device), self.numerics():
            buffers = self._bind(x, labels, seeds, group_ids, reset=i == self.context.num_steps - 1)
            buffers.tracing = False
            result = self.advance(buffers.x, i, buffers, noise)
            if i == 0:
                self.finish_batch(buffers)  # the one host synchronisation of a trajectory, after its last step
        return result

    # ---- batch binding --------------------------------------------------------------------------
    def _bind(self, x, labels, seeds, group_ids, reset: bool) -> _BatchBuffers:
        """The static buffers of x's batch shape, holding this batch (labels, keys and groups copied in)."""
        batch = x.shape[0]
        key = (batch, group_ids is not None)
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = _BatchBuffers(batch, x.shape[1:], self.device, group_ids is not None,
                                                         self.context.conditional)
        label_tensor = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if label_tensor.numel() != batch:
            raise IGDSInputError(f"got {label_tensor.numel()} labels for a batch of {batch}")
        buffers.labels.copy_(label_tensor)
        if buffers.prior_labels is not None:
            buffers.prior_labels.copy_(self.context.prior_labels(buffers.labels))
        buffers.has_seeds = seeds is not None
        if seeds is not None:
            seed_tensor = seeds_to_tensor(seeds, self.device)  # one host-to-device copy per batch
            if seed_tensor.shape != (batch,):
                raise IGDSInputError(f"got {seed_tensor.shape[0]} seeds for a batch of {batch}")
            buffers.seeds.copy_(seed_tensor)
        if group_ids is not None:
            buffers.group_ids.copy_(torch.as_tensor(group_ids, dtype=torch.long).reshape(-1))
        if reset:
            buffers.tracker.reset()
        if x is not buffers.x:
            buffers.x.copy_(x)
        return buffers

    # ---- the step body (captured or run directly) ---------------------------------------------------
    def _body(self, b: _BatchBuffers, i: int, noise_kind: str) -> torch.Tensor:
        """One reverse step from the static buffers into b.x (in place); returns the UNet output."""
        tracker = b.tracker if self.context.guidance_config.check_finite else None
        return reverse_step(self.ops, b.x, b.inputs(i, noise_kind), tracker)[1]

    # ---- the first-step self-check (self_check.py) ------------------------------------------------
    def _self_check(self, b: _BatchBuffers, x_before: torch.Tensor, i: int, noise_kind: str) -> dict:
        """Compare this step's first results with the eager float32 reference; raise on a disagreement.

        x_before: x_t of the batch before the step (b.x now holds x_{t-1}); b.index still holds i.
        Returns {"index", "images", "parts": [per-part comparison]} when every part agrees.
        """
        c = self.context
        cfg = c.guidance_config
        reference_guidance = c.guidance  # the eager head (GuidanceConfig.head) and the float32 encoder
        unet_tolerances = SELF_CHECK_TOLERANCES[self.compile_config.dtype]
        encoder_tolerances = SELF_CHECK_TOLERANCES[self.compile_config.encoder_dtype]
        rows = checked_rows(b.labels, b.group_ids, coupled=cfg.gamma != 0.0)
        x_rows, labels = x_before[rows], b.labels[rows]
        groups = None if b.group_ids is None else b.group_ids[rows]
        timesteps = c.schedule.timestep_map[i].expand(rows.numel())
        prior_labels = None if b.prior_labels is None else b.prior_labels[rows]
        results = []
        with fp32_reference_math(self.device), torch.no_grad():
            expected_output = c.unet(x_rows, timesteps, prior_labels)
        results.append(compare("unet", self.last_model_output[rows], expected_output, unet_tolerances["unet"]))

        x0_rows = fast_grad = None
        if any(c.guided(k) for k in range(c.num_steps)):
            # The guidance of the same x0 prediction (this step's, full batch: the compiled encoder
            # keeps its one static shape), fast vs reference.
            with torch.no_grad():
                x0 = predict_x0(x_before, self.last_model_output, b.index, self.tables, c.learn_sigma,
                                clip=cfg.clip_x0)
            x0_rows = x0[rows]
            if reference_guidance.decoder is not None:
                # The decoded image the encoder sees (a latent prior), fast copy vs float32 decoder.
                with torch.no_grad():
                    fast_image = self.ops.guidance.decode(x0)
                with fp32_reference_math(self.device), torch.no_grad():
                    expected_image = reference_guidance.decode(x0_rows)
                results.append(compare("decoder", fast_image[rows], expected_image,
                                       SELF_CHECK_TOLERANCES[self.compile_config.decoder_dtype]["decoder"]))
            with torch.enable_grad():
                fast_features = self.ops.guidance.encode(x0.detach().requires_grad_(True)).detach()
            with fp32_reference_math(self.device), torch.no_grad():
                expected_features = reference_guidance.encode(x0_rows)
            results.append(compare("features", fast_features[rows], expected_features, encoder_tolerances["features"]))
            # The Triton head (always fp32) on the reference features against the reference head.
            _, fast_head = self.ops.guidance.head_gradient(expected_features, labels, groups)
            with fp32_reference_math(self.device):
                _, expected_head = reference_guidance.head_gradient(expected_features, labels, groups)
            results.append(compare("head", fast_head, expected_head, encoder_tolerances["head"]))
            _, fast_grad = self.ops.guidance(x0, b.labels, b.group_ids)
            with fp32_reference_math(self.device):
                _, expected_grad = reference_guidance(x0_rows, labels, groups)
            results.append(compare("gradient", fast_grad[rows], expected_grad, encoder_tolerances["gradient"]))

        # The update (fused kernel, and its CUDA graph) against the eager update of the same inputs:
        # this step's own UNet output and guidance gradient, recomputed outside the graph. (The
        # eager step from x_t itself is no test of the update: at the first step x0_hat =
        # x_t / sqrt(abar) - sqrt(1/abar - 1) eps amplifies the UNet's rounding by sqrt(1/abar - 1),
        # so its guidance sees another x0_hat.)
        step_grad = None
        if c.guided(i):
            if cfg.mode == "xt":
                inputs = b.inputs(i, "none")
                inputs.trace = None
                step_grad = self.ops.unet_and_gradient(x_before, inputs)[2]
            else:
                step_grad = fast_grad
        if noise_kind == "tensor":
            noise = b.noise[rows]
        elif noise_kind == "philox" and i > 0:
            noise = philox_normal(b.seeds[rows], i, x_before.shape[1:], self.device)
        else:
            noise = None
        inputs = StepInputs(i, b.index, labels, prior_labels, groups, None, noise)
        with torch.no_grad():
            expected_next = StepOps(c).update(x_rows, self.last_model_output[rows], None,
                                              None if step_grad is None else step_grad[rows], inputs)
        results.append(compare("step", b.x[rows], expected_next, unet_tolerances["step"]))

        def describe(result):
            one = slice(result["worst_image"], result["worst_image"] + 1)  # diagnosis keeps every module's output
            return self._describe_failure(result, x_rows[one], timesteps[one],
                                          None if prior_labels is None else prior_labels[one],
                                          None if x0_rows is None else x0_rows[one])

        raise_if_failed(results, i, describe)
        return {"index": i, "images": int(rows.numel()), "parts": results}

    def _describe_failure(self, result, x_rows, timesteps, prior_labels, x0_rows):
        """(where, what, culprit) of a failed self-check part, locating the module on its worst image."""
        c = self.context
        cfg = self.compile_config
        compiled_note = f", torch.compile backend {cfg.backend}" if cfg.compile else ""
        part = result["part"]
        if part == "step":
            where = "fused DDPM update kernel" + (" / CUDA graph replay" if self.use_graphs else "")
            return where, "x_(t-1)", "the UNet output and the guidance agree: the update or its graph differs"
        if part == "unet":
            where = f"UNet copy ({cfg.dtype}{compiled_note})"
            if isinstance(self.unet_lp, LowPrecisionUNet):
                copy = self.unet_lp
                with fp32_reference_math(self.device):
                    found = first_diverging_module(
                        c.unet, copy.unet, lambda: c.unet(x_rows, timesteps, prior_labels),
                        lambda: copy(x_rows, timesteps, prior_labels), result["tolerance"],
                    )
                return where, "UNet output", self._culprit(found, cfg.dtype, "UNet", cfg.compile)
            return "TensorRT UNet engine", "UNet output", f"engine {cfg.unet_engine}"
        if part == "decoder":
            where = f"decoder copy ({cfg.decoder_dtype}{compiled_note if cfg.compile_encoder else ''})"
            decoder, copy = c.guidance.decoder, self.decoder_lp
            if isinstance(decoder, nn.Module) and isinstance(copy, nn.Module):
                with fp32_reference_math(self.device):
                    found = first_diverging_module(decoder, copy, lambda: decoder(x0_rows), lambda: copy(x0_rows),
                                                   result["tolerance"])
                return where, "decoded image", self._culprit(found, cfg.decoder_dtype, "decoder",
                                                             cfg.compile and cfg.compile_encoder)
            return where, "decoded image", None
        where = f"VE encoder copy ({cfg.encoder_dtype}{compiled_note if cfg.compile_encoder else ''})"
        if part == "head":
            return "Triton guidance head", "dJ/dz of the reference features", None
        if part == "gradient":  # features and head agree
            backward = "decoder's and encoder's" if c.guidance.decoder is not None else "encoder's"
            return where, "guidance gradient dJ/dx0", f"features and head agree: the {backward} input-gradient backward differs"
        ve = c.guidance.ve
        features = self.features_lp
        if isinstance(features, LowPrecisionFeatures) and isinstance(getattr(ve, "encoder", None), nn.Module):
            with fp32_reference_math(self.device):
                with torch.no_grad():  # the encoder's input: the decoded image of a latent prior
                    image = c.guidance.decode(x0_rows)
                found = first_diverging_module(
                    ve.encoder, features.encoder, lambda: ve.features(image), lambda: features(image),
                    result["tolerance"],
                )
            return where, "encoder features", self._culprit(found, cfg.encoder_dtype, "encoder",
                                                            cfg.compile and cfg.compile_encoder)
        return "VE features", "encoder features", None

    @staticmethod
    def _culprit(found, dtype: str, what: str, compiled: bool) -> str:
        if found is not None:
            name, kind, problem = found
            return f"first in {what} module '{name}' ({kind}): {problem} in the uncompiled {dtype} copy"
        if compiled:
            return (f"the uncompiled {dtype} copy agrees: a torch.compile fault; run with compile options "
                    f"{{\"compile\": false}} or another dtype")
        return "no single module leaves the tolerance: the error accumulates over the network"

    # ---- CUDA graphs --------------------------------------------------------------------------------
    def _replay(self, b: _BatchBuffers, i: int, noise_kind: str) -> torch.Tensor:
        key = (self.context.guided(i), noise_kind, b.tracing)
        entry = b.graphs.get(key)
        if entry is None:
            try:
                entry = b.graphs[key] = self._capture(b, i, noise_kind)
            except torch.cuda.OutOfMemoryError:
                raise IGDSInputError(
                    f"out of GPU memory capturing the step at batch {b.x.shape[0]}: pass a smaller batch_size "
                    f"(or memory_fraction, now {self.compile_config.memory_fraction})"
                ) from None
        graph, model_output = entry
        with nvtx_range("igds/graph/replay"):
            graph.replay()
        return model_output

    def _capture(self, b: _BatchBuffers, i: int, noise_kind: str):
        """Warm up on a side stream (compiles, autotunes), then capture the step body in a CUDA graph.

        Warm-up runs really execute the step; x_t and the non-finite tracker are restored afterwards
        so the batch is exactly where it was. All graphs of one batch shape share a memory pool: they
        never run concurrently and keep no value alive between replays outside the static buffers.
        The graph replays for every step i of the same (guided, noise kind): the body reads i from
        b.index only.
        """
        saved_x, saved_bad = b.x.clone(), b.tracker.latest.clone()
        saved_trace = b.trace.values.clone() if b.tracing else None
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), nvtx_range("igds/graph/warmup"):
            for _ in range(self.compile_config.warmup_iterations):
                self._body(b, i, noise_kind)
                b.x.copy_(saved_x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        b.tracker.latest.copy_(saved_bad)
        if saved_trace is not None:
            b.trace.values.copy_(saved_trace)
        if b.pool is None:
            b.pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None:
            # torch.cuda.graph's default capture stream is made once per process on whichever device
            # is current then: ops on another device would run outside the capture. Our own, on ours.
            self._capture_stream = torch.cuda.Stream(device=self.device)
        graph = torch.cuda.CUDAGraph()
        with nvtx_range("igds/graph/capture"), torch.cuda.graph(graph, pool=b.pool, stream=self._capture_stream):
            model_output = self._body(b, i, noise_kind)
        return graph, model_output

    def release_graphs(self) -> None:
        """Drop every captured graph and static buffer (their memory returns to the caching allocator).

        Graphs are kept per batch shape; a sampler whose last batch is smaller than the others captures
        (and, with dynamic=False, compiles) once more for it — padding that batch to the full size
        avoids both.
        """
        self._buffers.clear()
        self.last_model_output = None

    # ---- batch size -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Images per batch: CompileConfig.batch_size, else chosen from free device memory.

        CUDA: one eager step of the low-precision copies is probed at two batch sizes (peak memory
        above the baseline; `estimate_step_memory`); `choose_batch_size` fits the per-image and fixed
        costs into memory_fraction of the free memory (the driver's free memory plus what torch's
        caching allocator holds unused). The captured graph's pool keeps one step's intermediates.
        When the schedule has both guided and unguided steps (a guidance window), one batch shape
        captures two graphs and the second one's warm-up runs beside the first one's pool, so the
        costs are counted twice. CPU: CPU_BATCH_SIZE.
        """
        if self.compile_config.batch_size is not None:
            return self.compile_config.batch_size
        if self.compile_config.unet_engine is not None:
            return self.unet_lp.batch_size  # an engine runs the one batch size it was built for
        if self._chosen_batch_size is None:
            if self.device.type != "cuda":
                self._chosen_batch_size = CPU_BATCH_SIZE
            else:
                with on_device(self.device), self.numerics():
                    per_image, fixed = estimate_step_memory(self._probe_step_bytes)
                    free, _ = torch.cuda.mem_get_info(self.device)
                    # Blocks torch's caching allocator holds but does not use are free for this process.
                    free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                graphs = graphs_per_batch_shape(self.context.guidance_config, self.context.num_steps)
                self._chosen_batch_size = choose_batch_size(
                    per_image * graphs, free, fixed * graphs, self.compile_config.memory_fraction
                )
        return self._chosen_batch_size

    def _probe_step_bytes(self, batch: int) -> int:
        """Peak bytes above the current allocation of one guided step at `batch`, uncompiled."""
        c = self.context
        compiled_ops = self.ops
        self.ops = KernelOps(c, self.tables, unet_fn=self.unet_lp, features=self.features_lp, out_in_place=True,
                             decoder=self.decoder_lp)
        try:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            probe = _BatchBuffers(batch, c.image_shape, self.device, with_groups=False, conditional=c.conditional)
            probe.x.normal_(generator=torch.Generator(device=self.device).manual_seed(0))  # not the user's RNG
            guided = [i for i in range(c.num_steps) if c.guided(i)]
            i = guided[-1] if guided else c.num_steps - 1  # a guided step where there is one: the costlier
            probe.index.fill_(i)
            self._body(probe, i, "philox")
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        finally:
            self.ops = compiled_ops


def _check_triton_runs_here(device: torch.device) -> None:
    """Fail early (IGDSInputError) when the Triton kernels cannot run on `device` (the shared check)."""
    check_triton_runs_on(device)


__all__ = ["CompiledStep"]
