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
run checks itself against the eager float32 step (`self_check.py`; a failure is reported once).
The batch size, when not given, comes from free device memory (`memory.py`); the static buffers and
the step body they run are `buffers.py`'s. Before a step runs newly compiled code (the first step of
a batch shape), one line says what is compiled, at which batch size, in which mode and roughly how
long it takes; a heartbeat follows while it compiles, then each warm-up step's and the capture's
measured time (`announce.py`; `CompileConfig.compile_progress`).
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ...errors import IGDSInputError
# Importing the kernels selects Triton's interpreter on a machine without CUDA (see igds_fast.kernels).
from ...kernels import StepTables, seeds_to_tensor
from ...kernels._common import on_device
from ...profiling import nvtx_range
from ...progress import log_line
from ..backends import check_triton_runs_on
from ..fused import KernelOps
from ..step import GuidanceTrace, StepContext
from .announce import HEARTBEAT_S, CompileProgress, compile_line, describe_model, estimate_compile_seconds, leaf_modules
from .attention import resolve_attention
from .buffers import BatchBuffers, step_in_place
from .config import DTYPES, CompileConfig
from .low_precision import LowPrecisionFeatures, LowPrecisionUNet, compile_instance, low_precision_copy
from .memory import compiled_batch_size
from .self_check import run_self_check
from .tensorrt import engine_unet


@contextlib.contextmanager
def _building(piece: str):
    """A failure while building an optional piece of the step, as one line that names the piece."""
    try:
        yield
    except IGDSInputError:
        raise  # one line already
    except Exception as error:  # noqa: BLE001 - any failure of a third-party piece (xformers, TensorRT)
        detail = str(error).strip().splitlines()
        raise IGDSInputError(f"the compiled backend could not build its {piece}: {type(error).__name__}"
                             + (f": {detail[0]}" if detail else "")) from error


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
    """The stepper of `Sampler(backend="compiled")`: `CompiledStep(context, backend_options)`.

    Its jobs here: the low-precision copies and their compile, the static buffers, the CUDA graphs'
    capture and replay, and the glue; the first-step self-check is self_check.py's, the batch size
    memory.py's. The surface every backend shares: sampling.backends.Stepper.
    begin_batch(x [B,C,H,W], labels [B], seeds, group_ids) -> (the static x holding x_T, its buffers);
    advance(x, i, buffers, noise=None) -> x_{i-1} (the static buffer); finish_batch(buffers) reads the
    non-finite tracker once; __call__(x, i, labels, noise=None, group_ids=None, seeds=None) is one
    step on its own (inputs copied in at every call; the tracker is reset at i = N-1, read at i = 0).
    Attributes: compile_config (CompileConfig resolved for the device), attention ("sdpa"/"xformers"/
    "tensorrt"), use_graphs (bool; the bench flips it to time one compilation with and without
    graphs), unet_lp / features_lp / decoder_lp (the low-precision modules; unet_lp is the
    TensorRTUNet when CompileConfig.unet_engine is set), ops (the KernelOps the step runs), tables
    (the kernels' coefficient tables), buffers (the static BatchBuffers per (batch, with groups),
    read-only), last_model_output (fp32 UNet output of the latest step, [B, 2C or C, H, W], a static
    buffer in graph mode), batch_size, self_check_report (the passed check's errors, else None), log
    (where the compile's lines go: one line on stderr, or nothing with CompileConfig.compile_progress=False;
    assign another callable taking a str to redirect them), heartbeat_s (seconds between "still
    compiling" lines).
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
            with _building(f"TensorRT UNet engine {cfg.unet_engine}"):
                self.unet_lp = engine_unet(cfg, context)
            self.attention = "tensorrt"
        else:
            self.unet_lp = LowPrecisionUNet(low_precision_copy(unet, self.dtype, cfg.channels_last), self.dtype,
                                            cfg.channels_last)
            with _building(f"attention {cfg.attention!r}"):
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
                unet_fn = compile_instance(self.unet_lp, **kwargs)
            if cfg.compile_encoder:
                features_fn = (compile_instance(self.features_lp, **kwargs) if isinstance(self.features_lp, nn.Module)
                               else torch.compile(self.features_lp, **kwargs))
                if isinstance(self.decoder_lp, nn.Module):
                    decoder_fn = compile_instance(self.decoder_lp, **kwargs)
        self.ops = KernelOps(context, self.tables, unet_fn=unet_fn, features=features_fn, out_in_place=True,
                             decoder=decoder_fn)
        self.use_graphs = cfg.cuda_graphs
        self._buffers: dict[tuple[int, bool], BatchBuffers] = {}
        self._batch_size: int | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.last_model_output: torch.Tensor | None = None
        self._self_check_pending = cfg.self_check
        self.self_check_report: dict | None = None  # the passed check's measured errors (self_check.py)
        self.log: Callable[[str], None] = log_line if cfg.compile_progress else _silent
        self.heartbeat_s = HEARTBEAT_S
        self._compiled: set[tuple] = set()  # (part, batch, passes) whose compiled code has run

    def numerics(self):
        """cuDNN's benchmark mode for this backend's steps only (CompileConfig.cudnn_benchmark, CUDA)."""
        return _cudnn_benchmark(self.device.type == "cuda" and self.compile_config.cudnn_benchmark)

    @property
    def buffers(self) -> Mapping[tuple[int, bool], BatchBuffers]:
        """The static buffers bound so far, per (batch size, with group ids): one set per batch shape."""
        return types.MappingProxyType(self._buffers)

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

    def advance(self, x, i: int, buffers: BatchBuffers, noise=None) -> torch.Tensor:
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
                notice = self._compile_notice(buffers, i)
                with nvtx_range("igds/compiled/step"), self._compiling(notice) as progress:
                    self.last_model_output = self._body(buffers, i, noise_kind)
                    if progress is not None:
                        self._synchronize()
                        progress.done("first step (the compile)")
            if checking:
                self._self_check_pending = False  # once per run: a failure is reported once, not at every call
                with nvtx_range("igds/compiled/self_check"):
                    self.self_check_report = run_self_check(self, buffers, x_before, i, noise_kind)
        return buffers.x

    def finish_batch(self, buffers: BatchBuffers) -> None:
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
    def _bind(self, x, labels, seeds, group_ids, reset: bool) -> BatchBuffers:
        """The static buffers of x's batch shape, holding this batch (labels, keys and groups copied in)."""
        batch = x.shape[0]
        key = (batch, group_ids is not None)
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = BatchBuffers(batch, x.shape[1:], self.device, group_ids is not None,
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
    def _body(self, b: BatchBuffers, i: int, noise_kind: str) -> torch.Tensor:
        """One reverse step from the static buffers into b.x (in place); returns the UNet output."""
        return step_in_place(self.ops, b, i, noise_kind, self.context.guidance_config.check_finite)

    # ---- CUDA graphs --------------------------------------------------------------------------------
    def _replay(self, b: BatchBuffers, i: int, noise_kind: str) -> torch.Tensor:
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

    def _capture(self, b: BatchBuffers, i: int, noise_kind: str):
        """Warm up on a side stream (compiles, autotunes), then capture the step body in a CUDA graph.

        Warm-up runs really execute the step; x_t and the non-finite tracker are restored afterwards
        so the batch is exactly where it was. All graphs of one batch shape share a memory pool: they
        never run concurrently and keep no value alive between replays outside the static buffers.
        The graph replays for every step i of the same (guided, noise kind): the body reads i from
        b.index only.
        """
        saved_x, saved_bad = b.x.clone(), b.tracker.latest.clone()
        saved_trace = b.trace.values.clone() if b.tracing else None
        warmups = self.compile_config.warmup_iterations
        with self._compiling(self._compile_notice(b, i)) as progress:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), nvtx_range("igds/graph/warmup"):
                for k in range(warmups):
                    self._body(b, i, noise_kind)
                    b.x.copy_(saved_x)
                    if progress is not None:  # a compile's progress: each warm-up step timed (host sync)
                        self._synchronize()
                        progress.done(f"warm-up step {k + 1} of {warmups}" + (" (the compile)" if k == 0 else ""))
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
            if progress is not None:
                self._synchronize()
                progress.done("CUDA graph captured")
        return graph, model_output

    # ---- what a compile says (announce.py) ----------------------------------------------------------
    def _compile_notice(self, b: BatchBuffers, i: int) -> tuple[str, float, list[tuple]] | None:
        """(the line to log, the estimated seconds, the parts' keys) when step i at b's batch size runs
        compiled code for the first time, else None."""
        cfg = self.compile_config
        if not cfg.compile:
            return None
        batch = b.x.shape[0]
        guided = self.context.guided(i)
        xt = self.context.guidance_config.mode == "xt"
        parts = []  # (key, description, module, passes)
        if cfg.unet_engine is None:
            passes = 2 if guided and xt else 1
            parts.append((("unet", batch, passes), f"the UNet{' forward + backward' if passes == 2 else ''} "
                          f"({describe_model(self.unet_lp)}, {cfg.dtype})", self.unet_lp, passes))
        if cfg.compile_encoder and guided:
            parts.append((("encoder", batch, 2), f"the encoder forward + input-gradient backward "
                          f"({describe_model(self.features_lp)}, {cfg.encoder_dtype})", self.features_lp, 2))
            if isinstance(self.decoder_lp, nn.Module):
                parts.append((("decoder", batch, 2), f"the decoder forward + input-gradient backward "
                              f"({describe_model(self.decoder_lp)}, {cfg.decoder_dtype})", self.decoder_lp, 2))
        parts = [part for part in parts if part[0] not in self._compiled]
        if not parts:
            return None
        modules = sum(leaf_modules(module) * passes for _, _, module, passes in parts)
        estimate = estimate_compile_seconds(modules, cfg.backend, self.device.type, cfg.mode)
        chosen = (cfg.batch_size is None and cfg.unet_engine is None and self.device.type == "cuda"
                  and self._batch_size == batch)
        line = compile_line([part[1] for part in parts], batch, " (chosen from free device memory)" if chosen else "",
                            cfg.backend, cfg.mode, estimate, self.device.type)
        return line, estimate, [part[0] for part in parts]

    @contextlib.contextmanager
    def _compiling(self, notice):
        """Around a step that compiles: its line first, a CompileProgress while it runs (None: no compile)."""
        if notice is None:
            yield None
            return
        line, estimate, keys = notice
        if self.log is _silent:
            yield None
        else:
            self.log(line)
            with CompileProgress(self.log, estimate, self.heartbeat_s) as progress:
                yield progress
        self._compiled.update(keys)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_graphs(self) -> None:
        """Drop every captured graph and static buffer (their memory returns to the caching allocator).

        Graphs are kept per batch shape; a sampler whose last batch is smaller than the others captures
        (and, with dynamic=False, compiles) once more for it — padding that batch to the full size
        avoids both.
        """
        self._buffers.clear()
        self.last_model_output = None

    # ---- batch size (memory.py) ----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Images per batch: given, the engine's, or chosen from free device memory once (memory.compiled_batch_size)."""
        if self._batch_size is None:
            self._batch_size = compiled_batch_size(self)
        return self._batch_size


def _silent(message: str) -> None:
    """CompiledStep.log with CompileConfig.compile_progress=False."""


def _check_triton_runs_here(device: torch.device) -> None:
    """Fail early (IGDSInputError) when the Triton kernels cannot run on `device` (the shared check)."""
    check_triton_runs_on(device)


__all__ = ["CompiledStep"]
