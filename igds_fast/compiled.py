"""The compiled backend: a low-precision, torch.compile'd reverse step, captured once in a CUDA graph.

`Sampler(..., backend="compiled", backend_options=CompileConfig(...) or a dict of its fields)` runs
`CompiledStep`. One guided reverse step (x0 mode), shapes [B, C, H, W] unless noted:

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
device-to-device from a table built once (`FusedStep.step_indices`) and replays the CUDA graph of
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
`igds-fast export-unet --engine` (igds_fast.tensorrt_unet) instead of torch.compile; the rest of the
step, and its capture in one CUDA graph, are unchanged.

The guidance head is always the Triton `guidance_head` (GuidanceConfig.head is ignored), as in
`igds_fast.fused_step.FusedStep`, whose coefficient tables, device step indices and seed handling
this backend reuses.
"""
from __future__ import annotations

import copy
import os
import types
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .errors import IGDSInputError
from .fused_step import FusedStep
from .self_check import SELF_CHECK_TOLERANCES, checked_rows, compare, first_diverging_module, raise_if_failed
from .guidance import image_guidance
# Importing the kernels selects Triton's interpreter on a machine without CUDA (see igds_fast.kernels).
from .kernels import fused_ddpm_update, guidance_head, philox_normal, predict_x0, seeds_to_tensor
from .kernels._common import on_device
from .profiling import nvtx_range

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_BACKENDS = ("sdpa", "xformers", "auto")
COMPILE_BACKENDS = ("inductor", "aot_eager")
# "reduce-overhead" / "max-autotune" are refused: they make inductor capture CUDA graphs of its own,
# which cannot nest inside the whole-step graph this backend captures.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

# Inductor flags for convolutional diffusion UNets (PyTorch's "diffusion-fast" / SDXL recipe):
# 1x1 convolutions (ADM's attention qkv / proj_out are Conv1d k=1, skip convs) as matmuls, so they can
# fuse with neighbouring pointwise ops and use the GEMM autotuner; coordinate-descent tuning of the
# generated pointwise/reduction kernels (GroupNorm + SiLU + residual fusions dominate the non-conv time);
# no epilogue fusion into autotuned GEMM templates (it measured slower in that recipe). bench/sampler.py
# --inductor-options times alternatives on the device at hand.
CONV_UNET_INDUCTOR_OPTIONS: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
CPU_BATCH_SIZE = 8  # on CPU the batch is bounded by time, never by memory


# ---- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileConfig:
    """How the compiled backend builds its step. Every field is validated (one-line IGDSInputError).

    dtype: compute dtype of the UNet copy, "bf16" (default), "fp16", or "fp32" (CPU testing /
        debugging). GroupNorm statistics and the attention softmax stay fp32 whatever the dtype.
    encoder_dtype: compute dtype of the VE encoder copy; None = `dtype`. The guidance head, the x0
        prediction and the update always compute in fp32.
    channels_last: NHWC memory format for both copies (tensor-core convolutions want it).
    compile: torch.compile the UNet (and the encoder, see `compile_encoder`); False = run the
        low-precision copies eagerly (still graph-captured on CUDA).
    compile_encoder: also compile the encoder forward (its input-gradient backward is then compiled by
        AOTAutograd).
    backend: torch.compile backend, "inductor" (default) or "aot_eager" (dynamo + AOTAutograd, no
        code generation: the cheap CPU test mode).
    mode: inductor mode, "default" or "max-autotune-no-cudagraphs"; None = the latter on CUDA,
        "default" on CPU (max-autotune on CPU only costs compile time).
    inductor_options: inductor config overrides (merged over the mode's); None = CONV_UNET_INDUCTOR_OPTIONS
        on CUDA, none on CPU.
    cuda_graphs: capture the whole step in a CUDA graph per batch shape (forced False without CUDA).
    attention: "auto" (default: xformers only when it is importable, the device is CUDA AND the
        copy's UNet forward measures faster with it than with SDPA; else sdpa — measured, not
        assumed; xformers is an optional extra), "sdpa" (ADM attention on 4-D contiguous q/k/v, which
        the fused SDPA kernels take — see the attention section), or "xformers" (must be importable).
    batch_size: images per batch; None = `choose_batch_size` from free device memory (see
        `CompiledStep.batch_size`).
    memory_fraction: share of the free device memory a chosen batch may use.
    warmup_iterations: step bodies run on a side stream before a graph capture (>= 1; compiles,
        autotunes and initialises cuBLAS/cuDNN workspaces outside the capture).
    cudnn_benchmark: set torch.backends.cudnn.benchmark (process-wide) on CUDA: the convolution
        algorithms are then chosen by measurement during the warm-up, before capture.
    unet_engine: path of a TensorRT engine of this UNet (igds-fast export-unet --engine) that runs
        in place of the torch.compile'd UNet (CUDA, guidance mode x0, the engine's batch size; the
        engine's own precision — dtype then applies to the encoder only). None = torch.compile.
    self_check: compare the first step of the run with the eager float32 step on the same batch
        and stop with one line naming the part and module when they disagree beyond the dtype's
        tolerance (igds_fast.self_check; costs one eager step on a few images, once per run).
    """

    dtype: str = "bf16"
    encoder_dtype: str | None = None
    channels_last: bool = True
    compile: bool = True
    compile_encoder: bool = True
    backend: str = "inductor"
    mode: str | None = None
    inductor_options: Mapping[str, Any] | None = field(default=None, hash=False)
    cuda_graphs: bool = True
    attention: str = "auto"
    batch_size: int | None = None
    memory_fraction: float = 0.8
    warmup_iterations: int = 2
    cudnn_benchmark: bool = True
    unet_engine: str | None = None
    self_check: bool = True

    def __post_init__(self):
        for name in ("dtype", "encoder_dtype"):
            value = getattr(self, name)
            if not (value is None and name == "encoder_dtype") and value not in DTYPES:
                raise IGDSInputError(f"compile {name} must be one of {tuple(DTYPES)}, got {value!r}")
        for name in ("channels_last", "compile", "compile_encoder", "cuda_graphs", "cudnn_benchmark", "self_check"):
            if not isinstance(getattr(self, name), bool):
                raise IGDSInputError(f"compile option {name} must be True or False, got {getattr(self, name)!r}")
        if self.backend not in COMPILE_BACKENDS:
            raise IGDSInputError(f"compile backend must be one of {COMPILE_BACKENDS}, got {self.backend!r}")
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise IGDSInputError(
                f"compile mode must be one of {COMPILE_MODES} (modes with inductor CUDA graphs cannot nest "
                f"in the step's own graph), got {self.mode!r}"
            )
        if self.inductor_options is not None:
            if not isinstance(self.inductor_options, Mapping) or not all(
                isinstance(k, str) for k in self.inductor_options
            ):
                raise IGDSInputError("inductor_options must be a mapping of inductor config names to values")
            if self.backend != "inductor" and self.inductor_options:
                raise IGDSInputError("inductor_options apply to backend='inductor' only")
            object.__setattr__(self, "inductor_options", dict(self.inductor_options))
        if self.attention not in ATTENTION_BACKENDS:
            raise IGDSInputError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise IGDSInputError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if not isinstance(self.memory_fraction, (int, float)) or not 0 < self.memory_fraction <= 1:
            raise IGDSInputError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.unet_engine is not None and (
            not isinstance(self.unet_engine, str) or not os.path.isfile(self.unet_engine)
        ):
            raise IGDSInputError(f"unet_engine must be the path of a TensorRT engine file, got {self.unet_engine!r}")
        if isinstance(self.warmup_iterations, bool) or not isinstance(self.warmup_iterations, int) or (
            self.warmup_iterations < 1
        ):
            raise IGDSInputError(f"warmup_iterations must be an integer >= 1, got {self.warmup_iterations!r}")

    @classmethod
    def from_options(cls, options) -> "CompileConfig":
        """A CompileConfig from None (defaults), a CompileConfig, or a dict of its fields."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise IGDSInputError(f"unknown compile options {unknown}; known: {sorted(known)}")
            return cls(**options)
        raise IGDSInputError(f"backend_options must be a CompileConfig or a dict, got {type(options).__name__}")

    def for_device(self, device) -> "CompileConfig":
        """The configuration with the device-dependent defaults filled in (graphs off without CUDA)."""
        cuda = torch.device(device).type == "cuda"
        mode = self.mode or ("max-autotune-no-cudagraphs" if cuda else "default")
        options = self.inductor_options
        if options is None:
            options = dict(CONV_UNET_INDUCTOR_OPTIONS) if cuda and self.backend == "inductor" else {}
        return replace(
            self,
            mode=mode,
            inductor_options=options,
            cuda_graphs=self.cuda_graphs and cuda,
            encoder_dtype=self.encoder_dtype or self.dtype,
        )

    def compile_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of torch.compile (mode folded into inductor options: both cannot be given)."""
        kwargs: dict[str, Any] = dict(backend=self.backend, fullgraph=True, dynamic=False)
        if self.backend == "inductor":
            import torch._inductor

            options = dict(torch._inductor.list_mode_options(self.mode or "default"))
            options.update(self.inductor_options or {})
            options["triton.cudagraphs"] = False  # the step's own graph captures everything
            kwargs["options"] = options
        return kwargs


# ---- low-precision copies ---------------------------------------------------------------------------
def low_precision_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A frozen eval-mode deep copy of `module` with floating parameters/buffers in `dtype`.

    The original is untouched. Tensors are cast while copying (deepcopy memo), so peak memory is the
    original plus the low-precision copy, never two full-precision copies. Modules that must keep
    float32 statistics do so by themselves (ADM's GroupNorm32 promotes its input and weights).
    """
    memo: dict[int, Any] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in memo:
            continue
        cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
        if channels_last and cast.dim() == 4:
            cast = cast.contiguous(memory_format=torch.channels_last)
        memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
    duplicate = copy.deepcopy(module, memo)
    return duplicate.requires_grad_(False).eval()


class LowPrecisionUNet(nn.Module):
    """(x_t [B, C, H, W] fp32, timesteps [B], y [B] or None) -> UNet output [B, 2C or C, H, W] fp32.

    The input is cast to the copy's dtype (and NHWC) inside the compiled region, so the casts fuse
    with the first and last convolutions; the output comes back fp32 and contiguous NCHW, the layout
    the Triton kernels read.
    """

    def __init__(self, unet: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.unet, self.dtype, self.channels_last = unet, dtype, channels_last
        self.eval()  # inference only (the wrapped copy is frozen in eval mode already)

    def forward(self, x, timesteps, y=None):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.unet(x.to(self.dtype, memory_format=fmt), timesteps, y)
        return out.to(torch.float32, memory_format=torch.contiguous_format)


class LowPrecisionFeatures(nn.Module):
    """x0_hat [B, C, H, W] fp32 in [-1, 1] -> encoder features z [B, d] fp32, differentiable in x0_hat.

    The preprocess (resize + normalise) runs in fp32 on the shared, unmodified `preprocess` module;
    the encoder runs in its copy's dtype.
    """

    def __init__(self, preprocess: nn.Module, encoder: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.preprocess, self.encoder = preprocess, encoder
        self.dtype, self.channels_last = dtype, channels_last

    def forward(self, image):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        pixels = self.preprocess(image).to(self.dtype, memory_format=fmt)
        return self.encoder.forward_features(pixels).float()


# ---- attention ----------------------------------------------------------------------------------
# ADM's `AttentionBlock._attention` hands SDPA 3-D [B*H, T, c] views whose last dimension has stride T
# (q, k, v are transposes of the channel-first qkv conv output). PyTorch's fused SDPA kernels (flash,
# memory-efficient, cuDNN) accept only 4-D inputs with a stride-1 last dimension, so that call takes
# SDPA's math fallback: T x T scores materialised in memory (T = 1024 at ADM-256's 32x32 level). The
# low-precision copy therefore rebinds `_attention` to the same computation on contiguous 4-D
# [B, H, T, c] tensors (one copy of q, k, v each), which the fused kernels take — their softmax
# statistics are fp32 whatever the input dtype. The user's model keeps its own method.
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails at import
        return False
    return True


def _attention_blocks(unet: nn.Module) -> list[nn.Module]:
    """ADM attention blocks (they expose `_attention(qkv)`, `num_heads` and `legacy_order`)."""
    return [
        m for m in unet.modules()
        if hasattr(m, "_attention") and hasattr(m, "num_heads") and hasattr(m, "legacy_order")
    ]


def _split_heads(block: nn.Module, qkv: torch.Tensor):
    """qkv [B, 3*H*c, T] -> contiguous q, k, v [B, H, T, c], in the block's channel order."""
    batch, width, length = qkv.shape
    heads = block.num_heads
    head_channels = width // (3 * heads)
    if block.legacy_order:  # per head [q, k, v] (QKVAttentionLegacy)
        q, k, v = qkv.reshape(batch, heads, 3 * head_channels, length).split(head_channels, dim=2)
    else:  # [all q, all k, all v], then heads (QKVAttention)
        q, k, v = (t.reshape(batch, heads, head_channels, length) for t in qkv.chunk(3, dim=1))
    return tuple(t.transpose(-1, -2).contiguous() for t in (q, k, v))


def _sdpa_attention(block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """ADM's attention through a fused SDPA kernel: qkv [B, 3*H*c, T] -> [B, H*c, T].

    On CPU a low-precision copy computes the attention itself in float32 (workaround below); on
    CUDA the fused kernels take bf16/fp16 directly (their softmax statistics are fp32).
    """
    q, k, v = _split_heads(block, qkv)
    if qkv.device.type == "cpu" and qkv.dtype != torch.float32:
        # Workaround, torch 2.13 CPU, inductor's C++ backend: the digits prior's middle-block attention
        # (64 channels, 2 heads of 32, T = 64, legacy order) compiled in bf16 returned NaN for every
        # input on an Intel Xeon with AVX-512, while eager bf16, aot_eager and SDPA alone on the same
        # contiguous q/k/v were finite. Not reproduced on AMD EPYC (Zen 4): a CPU-dependent path,
        # perhaps ATen's bf16 CPU flash attention, which packs for AMX tiles where a CPU has them
        # (unconfirmed). Upstream reproduction, as reported:
        #     block = AttentionBlock(64, num_head_channels=32); lp = low_precision_copy(block, torch.bfloat16, True)
        #     set_attention(lp, "sdpa"); torch.compile(lp, fullgraph=True)(torch.randn(2, 64, 8, 8).bfloat16())
        # The float32 kernel (which takes MKL's GEMMs) sidesteps the bf16 CPU flash-attention path;
        # the cast costs nothing that matters on CPU, which is for testing. The first-step
        # self-check (igds_fast.self_check) catches any fault of this kind that is left.
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(qkv.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as ADM
    batch, heads, length, head_channels = out.shape
    return out.transpose(-1, -2).reshape(batch, heads * head_channels, length)


def _xformers_attention(block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """ADM's attention on xformers' memory-efficient kernel: qkv [B, 3*H*c, T] -> [B, H*c, T]."""
    import xformers.ops as xops

    q, k, v = (t.transpose(1, 2) for t in _split_heads(block, qkv))  # xformers: [B, T, H, c]
    out = xops.memory_efficient_attention(q, k, v)  # default scale 1/sqrt(c), as SDPA and ADM
    batch, length, heads, head_channels = out.shape
    return out.permute(0, 2, 3, 1).reshape(batch, heads * head_channels, length)


ATTENTION_IMPLEMENTATIONS = {"sdpa": _sdpa_attention, "xformers": _xformers_attention}


def set_attention(unet: nn.Module, name: str) -> int:
    """Route every ADM attention block of `unet` (a copy: this rebinds methods) through `name`.

    name: "sdpa" (fused SDPA kernels, 4-D contiguous layout) or "xformers". Returns the block count.
    """
    blocks = _attention_blocks(unet)
    for block in blocks:
        block._attention = types.MethodType(ATTENTION_IMPLEMENTATIONS[name], block)
    return len(blocks)


def _median_forward_ms(unet: nn.Module, x, timesteps, y, repeats: int = 5) -> float:
    with torch.no_grad():
        unet(x, timesteps, y)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(x, timesteps, y)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def resolve_attention(choice: str, unet_lp: LowPrecisionUNet, sampler, compiled: bool = False) -> str:
    """Install the attention implementation into the copy `unet_lp`; returns "sdpa" or "xformers".

    "auto" picks xformers only when it is importable, the device is CUDA, an eager forward of the
    copy at batch 2 measures faster with it than with SDPA (`faster_attention`), and — when the UNet
    is to be compiled with fullgraph=True — dynamo traces its attention without a graph break (an
    xformers build without torch custom-op registration would otherwise fail the compile).
    """
    blocks = _attention_blocks(unet_lp.unet)
    if choice == "xformers":
        if not xformers_available():
            raise IGDSInputError("attention='xformers' but xformers is not importable; use 'sdpa' or 'auto'")
        if not blocks:
            raise IGDSInputError("attention='xformers' needs an ADM UNet (no ADM attention blocks found)")
    set_attention(unet_lp.unet, "xformers" if choice == "xformers" else "sdpa")
    if choice != "auto" or not (blocks and xformers_available() and sampler.device.type == "cuda"):
        return "xformers" if choice == "xformers" else "sdpa"
    size, channels = sampler.image_size, sampler.channels
    x = torch.randn(2, channels, size, size, device=sampler.device)
    timesteps = torch.full((2,), 500, dtype=torch.long, device=sampler.device)
    conditional = getattr(sampler.unet, "num_classes", None) is not None
    y = torch.zeros(2, dtype=torch.long, device=sampler.device) if conditional else None
    chosen = faster_attention(unet_lp.unet, lambda: _median_forward_ms(unet_lp, x, timesteps, y))
    if chosen == "xformers" and compiled:
        block = blocks[0]
        qkv = torch.randn(2, block.qkv.out_channels, 64, device=sampler.device, dtype=unet_lp.dtype)
        if not traces_in_one_graph(block._attention, qkv):
            set_attention(unet_lp.unet, "sdpa")
            return "sdpa"
    return chosen


def traces_in_one_graph(fn: Callable, *args) -> bool:
    """Whether dynamo captures fn(*args) as one graph (fullgraph=True), run without code generation."""
    try:
        torch.compile(lambda *a: fn(*a), backend="eager", fullgraph=True, dynamic=False)(*args)
    except Exception:  # a graph break (Unsupported) or any tracing failure: not compilable in one graph
        return False
    return True


def faster_attention(unet: nn.Module, forward_ms: Callable[[], float]) -> str:
    """Time `forward_ms()` with SDPA then xformers installed in `unet`; keep (and return) the faster.

    Ties keep SDPA (no optional dependency on the hot path without a measured gain).
    """
    set_attention(unet, "sdpa")
    sdpa_ms = forward_ms()
    set_attention(unet, "xformers")
    if forward_ms() < sdpa_ms:
        return "xformers"
    set_attention(unet, "sdpa")
    return "sdpa"


# ---- batch size -----------------------------------------------------------------------------------
def choose_batch_size(
    per_image_bytes: int,
    free_bytes: int,
    fixed_bytes: int = 0,
    fraction: float = 0.8,
    max_batch: int = 256,
    multiple: int = 8,
) -> int:
    """The largest batch whose step fits in `fraction` of the free memory.

    per_image_bytes: peak memory one more image adds to a step; fixed_bytes: the batch-independent
    part (workspaces, scratch). The result is capped at max_batch and, when >= multiple, rounded down
    to a multiple of `multiple` (tensor-core friendly GEMM M dimensions in the guidance head / attention).
    Raises IGDSInputError when not even one image fits.
    """
    if per_image_bytes <= 0:
        raise IGDSInputError(f"per_image_bytes must be positive, got {per_image_bytes}")
    budget = free_bytes * fraction - fixed_bytes
    batch = int(budget // per_image_bytes)
    if batch < 1:
        raise IGDSInputError(
            f"not enough free memory for one image: a step needs {per_image_bytes / 2**30:.2f} GiB per image "
            f"+ {fixed_bytes / 2**30:.2f} GiB, {free_bytes / 2**30:.2f} GiB free (x{fraction} usable)"
        )
    batch = min(batch, max_batch)
    if batch >= multiple:
        batch -= batch % multiple
    return batch


# ---- the step -------------------------------------------------------------------------------------
class _BatchBuffers:
    """Static device buffers of one batch shape; every graph of that shape reads/writes only these.

    x [B, C, H, W] fp32 (x_t in, x_{t-1} out), noise [B, C, H, W] (only for explicitly given noise),
    labels [B] int64, seeds [B] int64 (Philox keys), group_ids [B] int64 or None, index 0-d int64
    (respaced step i), first_bad [B] int64 (latest respaced index with a non-finite gradient, -1 = none).
    """

    def __init__(self, batch: int, image_shape, device, with_groups: bool):
        self.x = torch.zeros(batch, *image_shape, device=device)
        self.noise: torch.Tensor | None = None
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.group_ids = torch.zeros(batch, dtype=torch.long, device=device) if with_groups else None
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.bound: tuple = (None, None, None)  # the (labels, seeds, group_ids) objects copied in
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None


class CompiledStep:
    """The step seam of `Sampler(backend="compiled")`: `CompiledStep(sampler, backend_options)`.

    begin_batch(x [B,C,H,W], labels [B], seeds, group_ids) -> the static x buffer holding x_T.
    __call__(x, i, labels, noise=None, group_ids=None, seeds=None) -> x_{i-1} (the static buffer).
    Attributes: config (CompileConfig resolved for the device), attention ("sdpa"/"xformers"/
    "tensorrt"), use_graphs (bool; the bench flips it to time one compilation with and without
    graphs), unet_lp / features_lp (the low-precision modules; unet_lp is the TensorRTUNet when
    CompileConfig.unet_engine is set), last_model_output (fp32 UNet output of the latest step,
    [B, 2C or C, H, W], a static buffer in graph mode).
    """

    def __init__(self, sampler, backend_options=None, reference=None):
        self.sampler = sampler
        self.device = sampler.device
        self.config = CompileConfig.from_options(backend_options).for_device(self.device)
        cfg = self.config
        if cfg.self_check and reference is None:
            raise IGDSInputError("the compiled backend's self-check needs the eager reference step (reference=)")
        self.reference = reference  # the sampler's eager float32 step: the first-step self-check's reference
        _check_triton_runs_here(self.device)
        if self.device.type == "cuda" and cfg.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True

        fused = FusedStep(sampler)  # fp32 coefficient tables + device step indices, built once
        self.tables, self.step_indices = fused.tables, fused.step_indices
        self.dtype, self.encoder_dtype = DTYPES[cfg.dtype], DTYPES[cfg.encoder_dtype]

        unet = sampler.unet
        if not isinstance(unet, nn.Module):
            raise IGDSInputError(f"the compiled backend needs an nn.Module UNet, got {type(unet).__name__}")
        if cfg.unet_engine is not None:
            self.unet_lp = _engine_unet(cfg, sampler)
            self.attention = "tensorrt"
        else:
            self.unet_lp = LowPrecisionUNet(low_precision_copy(unet, self.dtype, cfg.channels_last), self.dtype,
                                            cfg.channels_last)
            self.attention = resolve_attention(cfg.attention, self.unet_lp, sampler, compiled=cfg.compile)

        ve = sampler.ve
        encoder = getattr(ve, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "forward_features"):
            self.features_lp: Callable = LowPrecisionFeatures(
                ve.preprocess, low_precision_copy(encoder, self.encoder_dtype, cfg.channels_last),
                self.encoder_dtype, cfg.channels_last,
            )
        else:  # a duck-typed VE without a ResNet trunk: its own features(), as given
            self.features_lp = ve.features

        self._unet, self._features = self.unet_lp, self.features_lp
        if cfg.compile:
            kwargs = cfg.compile_kwargs()
            if cfg.unet_engine is None:
                self._unet = torch.compile(self.unet_lp, **kwargs)
            if cfg.compile_encoder:
                self._features = torch.compile(self.features_lp, **kwargs)
        self.use_graphs = cfg.cuda_graphs
        self._buffers: dict[tuple[int, bool], _BatchBuffers] = {}
        self._current: _BatchBuffers | None = None  # the buffers of the latest step
        self._chosen_batch_size: int | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.last_model_output: torch.Tensor | None = None
        self._self_check_pending = cfg.self_check
        self.self_check_report: dict | None = None  # the passed check's measured errors (self_check.py)

    # ---- the seam -------------------------------------------------------------------------------
    def begin_batch(self, x, labels, seeds, group_ids=None) -> torch.Tensor:
        """Copy a new batch (x_T, labels, seeds, group ids) into its static buffers; returns its static x."""
        with on_device(self.device):
            buffers = self._bind(x, labels, seeds, group_ids, new_batch=True)
        return buffers.x

    def __call__(self, x, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor:
        """x_{i-1} from x_i = x [B, C, H, W] at respaced index i (module docstring)."""
        # The sampler's device current for the whole step: Triton launches and the graph capture
        # stream follow the current device, not the tensors' (matters for cuda:N with N != current).
        with on_device(self.device):
            return self._step(x, i, labels, noise, group_ids, seeds)

    def _step(self, x, i: int, labels, noise, group_ids, seeds) -> torch.Tensor:
        s = self.sampler
        buffers = self._bind(x, labels, seeds, group_ids, new_batch=False)
        if noise is not None:
            if tuple(noise.shape) != tuple(buffers.x.shape):
                raise IGDSInputError(f"noise must have shape {tuple(buffers.x.shape)}, got {tuple(noise.shape)}")
            if buffers.noise is None:
                buffers.noise = torch.empty_like(buffers.x)
            buffers.noise.copy_(noise)
            noise_kind = "tensor"
        else:
            noise_kind = "philox" if seeds is not None else "none"
        step = s.schedule.num_steps - 1 - i
        guided = s.guidance.guides_step(step)
        # The first step of a run is checked against the eager float32 step (once per run).
        checking = self._self_check_pending and i == s.schedule.num_steps - 1
        x_before = buffers.x.clone() if checking else None
        buffers.index.copy_(self.step_indices[i])  # device-to-device: no host value enters the graph
        if self.use_graphs:
            self.last_model_output = self._replay(buffers, guided, noise_kind)
        else:
            with nvtx_range("igds/compiled/step"):
                self.last_model_output = self._body(buffers, guided, noise_kind)
        if checking:
            with nvtx_range("igds/compiled/self_check"):
                self.self_check_report = self._self_check(buffers, x_before, i, noise_kind)
            self._self_check_pending = False
        if i == 0 and s.guidance.check_finite:
            self.raise_if_nonfinite(buffers)  # the one host synchronisation of a batch, after its last step
        return buffers.x

    def raise_if_nonfinite(self, buffers: _BatchBuffers | None = None) -> None:
        """Raise the eager step's IGDSInputError if a guidance gradient of the batch was non-finite.

        Reads the device tracker (one host synchronisation). Names the earliest bad sampling step.
        """
        buffers = buffers or self._current
        if buffers is None:
            return
        latest_bad_index = buffers.first_bad.max().item()
        if latest_bad_index >= 0:
            bad = buffers.first_bad >= 0
            labels = sorted(set(buffers.labels[bad].tolist()))
            step = self.sampler.schedule.num_steps - 1 - latest_bad_index
            raise IGDSInputError(
                f"non-finite guidance gradient at sampling step {step} "
                f"(respaced index {latest_bad_index}) for labels {labels[:10]}"
            )

    # ---- batch binding --------------------------------------------------------------------------
    def _bind(self, x, labels, seeds, group_ids, new_batch: bool) -> _BatchBuffers:
        """The static buffers of x's batch shape, holding this batch (copies only what changed)."""
        batch = x.shape[0]
        key = (batch, group_ids is not None)
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = _BatchBuffers(batch, x.shape[1:], self.device, group_ids is not None)
        self._current = buffers
        same = all(a is b for a, b in zip(buffers.bound, (labels, seeds, group_ids)))
        if new_batch or not same:
            label_tensor = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            if label_tensor.numel() != batch:
                raise IGDSInputError(f"got {label_tensor.numel()} labels for a batch of {batch}")
            buffers.labels.copy_(label_tensor)
            if seeds is not None:
                seed_tensor = seeds_to_tensor(seeds, self.device)  # one host-to-device copy per batch
                if seed_tensor.shape != (batch,):
                    raise IGDSInputError(f"got {seed_tensor.shape[0]} seeds for a batch of {batch}")
                buffers.seeds.copy_(seed_tensor)
            if group_ids is not None:
                buffers.group_ids.copy_(torch.as_tensor(group_ids, dtype=torch.long).reshape(-1))
            buffers.first_bad.fill_(-1)
            # The caller's own objects: the sampler passes the same ones every step, so the identity
            # test above skips every copy until the next batch.
            buffers.bound = (labels, seeds, group_ids)
        if x is not buffers.x:
            buffers.x.copy_(x)
        return buffers

    # ---- the step body (captured or run directly) ---------------------------------------------------
    def _body(self, b: _BatchBuffers, guided: bool, noise_kind: str) -> torch.Tensor:
        """One reverse step from the static buffers into b.x (in place); returns the UNet output."""
        s = self.sampler
        cfg = s.guidance
        batch = b.x.shape[0]
        timesteps = s.schedule.timestep_map.index_select(0, b.index.reshape(1)).expand(batch)
        prior_labels = s.prior_labels(b.labels)
        grad = None
        if guided and cfg.mode == "xt":
            with nvtx_range("igds/unet+guidance"):
                model_output, grad = self._xt_guidance(b, timesteps, prior_labels)
        else:
            with torch.no_grad(), nvtx_range("igds/unet"):
                model_output = self._unet(b.x, timesteps, prior_labels)
            if guided:
                with torch.no_grad():
                    x0 = predict_x0(b.x, model_output, b.index, self.tables, s.learn_sigma, clip=cfg.clip_x0)
                with nvtx_range("igds/guidance"):
                    grad = self._guidance(x0, b)  # dJ/dx0_hat for the detached x0 prediction
        with torch.no_grad(), nvtx_range("igds/update"):
            if guided and cfg.check_finite:
                # Device-side bookkeeping instead of the eager per-step host check (read after i = 0).
                finite = torch.isfinite(grad).flatten(1).all(dim=1)
                torch.maximum(b.first_bad, torch.where(finite, -1, b.index), out=b.first_bad)
            fused_ddpm_update(
                b.x,
                model_output,
                b.index,
                self.tables,
                s.learn_sigma,
                grad=grad,
                scale=cfg.scale,
                noise=b.noise if noise_kind == "tensor" else None,
                seeds=b.seeds if noise_kind == "philox" else None,
                clip=cfg.clip_x0,
                out=b.x,  # elementwise and same-index: each element is read before it is overwritten
            )
        return model_output

    def _guidance(self, image, b: _BatchBuffers, wrt=None) -> torch.Tensor:
        """dJ/d(wrt) [B, C, H, W] fp32 through the low-precision encoder and the Triton head."""
        s = self.sampler
        cfg = s.guidance
        _, grad = image_guidance(image, b.labels, s.ve, cfg.beta, s.tau, cfg.gamma, b.group_ids, guidance_head,
                                 wrt=wrt, features_fn=self._features)
        return grad

    def _xt_guidance(self, b: _BatchBuffers, timesteps, prior_labels):
        """(UNet output, dJ/dx_t) with autograd through the low-precision UNet (guidance mode xt)."""
        s = self.sampler
        with torch.enable_grad():
            x_in = b.x.detach().requires_grad_(True)
            model_output = self._unet(x_in, timesteps, prior_labels)
            eps, _ = s.schedule.split_model_output(model_output, s.channels, s.learn_sigma)
            x0 = s.schedule.predict_x0(x_in, eps, b.index, clip=s.guidance.clip_x0)
            grad = self._guidance(x0, b, wrt=x_in)
        return model_output.detach(), grad

    # ---- the first-step self-check (igds_fast.self_check) -------------------------------------------
    def _self_check(self, b: _BatchBuffers, x_before: torch.Tensor, i: int, noise_kind: str) -> dict:
        """Compare this step's first results with the eager float32 reference; raise on a disagreement.

        x_before: x_t of the batch before the step (b.x now holds x_{t-1}); b.index still holds i.
        Returns {"index", "images", "parts": [per-part comparison]} when every part agrees.
        """
        s = self.sampler
        cfg = s.guidance
        unet_tolerances = SELF_CHECK_TOLERANCES[self.config.dtype]
        encoder_tolerances = SELF_CHECK_TOLERANCES[self.config.encoder_dtype]
        rows = checked_rows(b.labels, b.group_ids, coupled=cfg.gamma != 0.0)
        x_rows, labels = x_before[rows], b.labels[rows]
        groups = None if b.group_ids is None else b.group_ids[rows]
        timesteps = s.schedule.timestep_map[i].expand(rows.numel())
        prior_labels = s.prior_labels(labels)
        reference_math = self.reference.reference_math
        results = []
        with reference_math(self.device), torch.no_grad():
            expected_output = s.unet(x_rows, timesteps, prior_labels)
        results.append(compare("unet", self.last_model_output[rows], expected_output, unet_tolerances["unet"]))

        x0_rows = None
        if any(cfg.guides_step(k) for k in range(s.schedule.num_steps)):
            # The guidance of the same x0 prediction (this step's, full batch: the compiled encoder
            # keeps its one static shape), fast vs reference.
            with torch.no_grad():
                x0 = predict_x0(x_before, self.last_model_output, b.index, self.tables, s.learn_sigma,
                                clip=cfg.clip_x0)
            x0_rows = x0[rows]
            with torch.enable_grad():
                fast_features = self._features(x0.detach().requires_grad_(True)).detach()
            with reference_math(self.device), torch.no_grad():
                expected_features = s.ve.features(x0_rows)
            results.append(compare("features", fast_features[rows], expected_features, encoder_tolerances["features"]))
            # The Triton head (always fp32) on the reference features against the reference head.
            head_args = (labels, s.ve.weight, s.ve.bias, s.ve.log_centroids, cfg.beta, s.tau, cfg.gamma, groups)
            _, fast_head = guidance_head(expected_features, *head_args)
            with reference_math(self.device):
                _, expected_head = self.reference.head(expected_features, *head_args)
            results.append(compare("head", fast_head, expected_head, encoder_tolerances["head"]))
            fast_grad = self._guidance(x0, b)
            with reference_math(self.device):
                _, expected_grad = image_guidance(x0_rows, labels, s.ve, cfg.beta, s.tau, cfg.gamma, groups,
                                                  self.reference.head)
            results.append(compare("gradient", fast_grad[rows], expected_grad, encoder_tolerances["gradient"]))

        # The update (fused kernel, and its CUDA graph) against the eager update of the same inputs:
        # this step's own UNet output and guidance gradient, recomputed outside the graph. (The
        # eager step from x_t itself is no test of the update: at the first step x0_hat =
        # x_t / sqrt(abar) - sqrt(1/abar - 1) eps amplifies the UNet's rounding by sqrt(1/abar - 1),
        # so its guidance sees another x0_hat.)
        guided = cfg.guides_step(s.schedule.num_steps - 1 - i)
        fast_step_grad = None
        if guided:
            if cfg.mode == "xt":
                inputs = types.SimpleNamespace(x=x_before, index=b.index, labels=b.labels, group_ids=b.group_ids)
                _, fast_step_grad = self._xt_guidance(inputs, s.schedule.timestep_map[i].expand(x_before.shape[0]),
                                                      s.prior_labels(b.labels))
            else:
                fast_step_grad = fast_grad
        if noise_kind == "tensor":
            noise = b.noise[rows]
        elif noise_kind == "philox" and i > 0:
            noise = philox_normal(b.seeds[rows], i, x_before.shape[1:], self.device)
        else:
            noise = None
        eps, v = s.schedule.split_model_output(self.last_model_output[rows], s.channels, s.learn_sigma)
        with torch.no_grad():
            expected_next = self.reference.update(
                x_rows, s.schedule.predict_x0(x_rows, eps, i, clip=cfg.clip_x0), v, i,
                None if fast_step_grad is None else fast_step_grad[rows], noise,
            )
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
        s = self.sampler
        cfg = self.config
        reference_math = self.reference.reference_math
        compiled_note = f", torch.compile backend {cfg.backend}" if cfg.compile else ""
        part = result["part"]
        if part == "step":
            where = "fused DDPM update kernel" + (" / CUDA graph replay" if self.use_graphs else "")
            return where, "x_(t-1)", "the UNet output and the guidance agree: the update or its graph differs"
        if part == "unet":
            where = f"UNet copy ({cfg.dtype}{compiled_note})"
            if isinstance(self.unet_lp, LowPrecisionUNet):
                copy = self.unet_lp
                with reference_math(self.device):
                    found = first_diverging_module(
                        s.unet, copy.unet, lambda: s.unet(x_rows, timesteps, prior_labels),
                        lambda: copy(x_rows, timesteps, prior_labels), result["tolerance"],
                    )
                return where, "UNet output", self._culprit(found, cfg.dtype, "UNet", cfg.compile)
            return "TensorRT UNet engine", "UNet output", f"engine {cfg.unet_engine}"
        where = f"VE encoder copy ({cfg.encoder_dtype}{compiled_note if cfg.compile_encoder else ''})"
        if part == "head":
            return "Triton guidance head", "dJ/dz of the reference features", None
        if part == "gradient":  # features and head agree
            return where, "guidance gradient dJ/dx0", "features and head agree: the encoder's input-gradient backward differs"
        features = self.features_lp
        if isinstance(features, LowPrecisionFeatures) and isinstance(getattr(s.ve, "encoder", None), nn.Module):
            with reference_math(self.device):
                found = first_diverging_module(
                    s.ve.encoder, features.encoder, lambda: s.ve.features(x0_rows), lambda: features(x0_rows),
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
    def _replay(self, b: _BatchBuffers, guided: bool, noise_kind: str) -> torch.Tensor:
        entry = b.graphs.get((guided, noise_kind))
        if entry is None:
            try:
                entry = b.graphs[(guided, noise_kind)] = self._capture(b, guided, noise_kind)
            except torch.cuda.OutOfMemoryError:
                raise IGDSInputError(
                    f"out of GPU memory capturing the step at batch {b.x.shape[0]}: pass a smaller batch_size "
                    f"(or memory_fraction, now {self.config.memory_fraction})"
                ) from None
        graph, model_output = entry
        with nvtx_range("igds/graph/replay"):
            graph.replay()
        return model_output

    def _capture(self, b: _BatchBuffers, guided: bool, noise_kind: str):
        """Warm up on a side stream (compiles, autotunes), then capture the step body in a CUDA graph.

        Warm-up runs really execute the step; x_t and the non-finite tracker are restored afterwards
        so the batch is exactly where it was. All graphs of one batch shape share a memory pool: they
        never run concurrently and keep no value alive between replays outside the static buffers.
        """
        saved_x, saved_bad = b.x.clone(), b.first_bad.clone()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), nvtx_range("igds/graph/warmup"):
            for _ in range(self.config.warmup_iterations):
                self._body(b, guided, noise_kind)
                b.x.copy_(saved_x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        b.first_bad.copy_(saved_bad)
        if b.pool is None:
            b.pool = torch.cuda.graph_pool_handle()
        if self._capture_stream is None:
            # torch.cuda.graph's default capture stream is made once per process on whichever device
            # is current then: ops on another device would run outside the capture. Our own, on ours.
            self._capture_stream = torch.cuda.Stream(device=self.device)
        graph = torch.cuda.CUDAGraph()
        with nvtx_range("igds/graph/capture"), torch.cuda.graph(graph, pool=b.pool, stream=self._capture_stream):
            model_output = self._body(b, guided, noise_kind)
        return graph, model_output

    def release_graphs(self) -> None:
        """Drop every captured graph and static buffer (their memory returns to the caching allocator).

        Graphs are kept per batch shape; a sampler whose last batch is smaller than the others captures
        (and, with dynamic=False, compiles) once more for it — padding that batch to the full size
        avoids both.
        """
        self._buffers.clear()
        self._current = None
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
        if self.config.batch_size is not None:
            return self.config.batch_size
        if self.config.unet_engine is not None:
            return self.unet_lp.batch_size  # an engine runs the one batch size it was built for
        if self._chosen_batch_size is None:
            if self.device.type != "cuda":
                self._chosen_batch_size = CPU_BATCH_SIZE
            else:
                with on_device(self.device):
                    per_image, fixed = estimate_step_memory(self._probe_step_bytes)
                    free, _ = torch.cuda.mem_get_info(self.device)
                    # Blocks torch's caching allocator holds but does not use are free for this process.
                    free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                graphs = graphs_per_batch_shape(self.sampler.guidance, self.sampler.schedule.num_steps)
                self._chosen_batch_size = choose_batch_size(
                    per_image * graphs, free, fixed * graphs, self.config.memory_fraction
                )
        return self._chosen_batch_size

    def _probe_step_bytes(self, batch: int) -> int:
        """Peak bytes above the current allocation of one guided step at `batch`, uncompiled."""
        s = self.sampler
        compiled = (self._unet, self._features)
        self._unet, self._features = self.unet_lp, self.features_lp
        try:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            probe = _BatchBuffers(batch, (s.channels, s.image_size, s.image_size), self.device, with_groups=False)
            probe.x.normal_()
            probe.index.fill_(s.schedule.num_steps - 1)
            self._body(probe, s.guidance.scale > 0, "philox")
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        finally:
            self._unet, self._features = compiled


def graphs_per_batch_shape(guidance, num_steps: int) -> int:
    """How many step graphs one batch shape captures: 2 when some steps are guided and some not."""
    return len({guidance.guides_step(step) for step in range(num_steps)})


def estimate_step_memory(probe_bytes: Callable[[int], int], sizes: tuple[int, int] = (2, 4)) -> tuple[int, int]:
    """(per-image bytes, fixed bytes) of one step, from `probe_bytes(batch)` peaks at two batch sizes.

    Each size is probed twice and the second reading kept: the first run of a shape allocates
    one-time state (cuBLAS/cuDNN workspaces, cudnn.benchmark trials) that would otherwise land in one
    reading and not the other. A difference that is not positive (allocator noise) falls back to
    counting the whole larger peak as per-image cost, which over-estimates and so stays safe. A
    probe that runs out of memory at the larger sizes retries at (1, 2).
    """
    small, large = sizes
    try:
        readings = {}
        for batch in (small, large):
            probe_bytes(batch)
            readings[batch] = probe_bytes(batch)
    except torch.cuda.OutOfMemoryError:
        if sizes == (1, 2):
            raise IGDSInputError("not enough free GPU memory for a step at batch 1") from None
        torch.cuda.empty_cache()
        return estimate_step_memory(probe_bytes, (1, 2))
    low, high = readings[small], readings[large]
    per_image = -(-(high - low) // (large - small))  # ceil
    if per_image <= 0:
        return -(-high // large), 0
    return per_image, max(low - small * per_image, 0)


def _engine_unet(cfg: CompileConfig, sampler):
    """The TensorRT engine of CompileConfig.unet_engine, checked against the sampler's prior."""
    from .tensorrt_unet import TensorRTUNet

    if sampler.guidance.mode != "x0":
        raise IGDSInputError("a TensorRT UNet engine supports guidance mode x0 only (mode xt needs UNet gradients)")
    if sampler.device.type != "cuda":
        raise IGDSInputError("a TensorRT UNet engine runs on a CUDA device only")
    engine = TensorRTUNet(cfg.unet_engine, sampler.device)
    engine.check_matches(cfg.batch_size, sampler.channels, sampler.image_size, sampler.learn_sigma,
                         getattr(sampler.unet, "num_classes", None) is not None)
    return engine


def _check_triton_runs_here(device: torch.device) -> None:
    """Fail early (IGDSInputError) when the Triton kernels cannot run on `device`."""
    if device.type == "cuda":
        return
    from .kernels import ddpm_update

    if os.environ.get("TRITON_INTERPRET") != "1" or type(ddpm_update._ddpm_update_kernel).__name__ != (
        "InterpretedFunction"
    ):
        raise IGDSInputError(
            "the compiled backend on CPU runs its Triton kernels in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before igds_fast.kernels (or triton) is first imported"
        )


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "CONV_UNET_INDUCTOR_OPTIONS",
    "CompileConfig",
    "CompiledStep",
    "LowPrecisionFeatures",
    "LowPrecisionUNet",
    "choose_batch_size",
    "estimate_step_memory",
    "graphs_per_batch_shape",
    "faster_attention",
    "low_precision_copy",
    "set_attention",
    "traces_in_one_graph",
    "xformers_available",
]
