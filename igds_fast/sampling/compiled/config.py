"""The compiled backend's configuration: `CompileConfig`, every field validated (one-line IGDSInputError)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

import torch

from ...errors import IGDSInputError
from ...settings import option

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_BACKENDS = ("sdpa", "xformers", "auto")
COMPILE_BACKENDS = ("inductor", "aot_eager")
# "reduce-overhead" / "max-autotune" are refused: they make inductor capture CUDA graphs of its own,
# which cannot nest inside the whole-step graph this backend captures.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

# The CUDA default compiles in minutes: mode "default" (no kernel benchmarking at compile time) plus
# one flag that costs no compile time: 1x1 convolutions (ADM's attention qkv / proj_out are Conv1d
# k=1, skip convs) as matmuls, so they fuse with neighbouring pointwise ops.
CONV_UNET_INDUCTOR_OPTIONS: dict[str, Any] = {"conv_1x1_as_mm": True}
# What mode "max-autotune-no-cudagraphs" adds for a convolutional UNet (PyTorch's "diffusion-fast" /
# SDXL recipe): coordinate-descent tuning of the generated pointwise / reduction kernels in every
# direction (GroupNorm + SiLU + residual fusions dominate the non-conv time; the mode itself already
# turns the tuning on in torch >= 2.6) and no epilogue fusion into the autotuned GEMM templates (it
# measured slower in that recipe). The tuning multiplies the first compile (pytorch/pytorch#136867:
# "doubled compilation time" on one model; autotuning 25 s -> 360 s on another, torchdynamo#1807) for a
# few percent on ResNets (1.4% on ResNet-50, #97203): one flag away, `--compile-mode
# max-autotune-no-cudagraphs`, its gain to be measured on a GPU (bench/gpu_check.sh, part adm256-ma).
AUTOTUNE_INDUCTOR_OPTIONS: dict[str, Any] = {
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}


@dataclass(frozen=True)
class CompileConfig:
    """How the compiled backend builds its step. Every field is validated (one-line IGDSInputError).

    dtype: compute dtype of the UNet copy, "bf16" (default), "fp16", or "fp32" (CPU testing /
        debugging). GroupNorm statistics and the attention softmax stay fp32 whatever the dtype.
    encoder_dtype: compute dtype of the VE encoder copy; None = `dtype`. The guidance head, the x0
        prediction and the update always compute in fp32.
    decoder_dtype: compute dtype of a latent prior's decoder copy (the VAE the guidance decodes every
        x0 prediction with); None = `encoder_dtype`. The final images are decoded by the float32 decoder.
    channels_last: NHWC memory format for both copies (tensor-core convolutions want it).
    compile: torch.compile the UNet (and the encoder, see `compile_encoder`); False = run the
        low-precision copies eagerly (still graph-captured on CUDA).
    compile_encoder: also compile the guidance path's forward — the encoder, and a latent prior's
        decoder — (their input-gradient backward is then compiled by AOTAutograd).
    backend: torch.compile backend, "inductor" (default) or "aot_eager" (dynamo + AOTAutograd, no
        code generation: the cheap CPU test mode).
    mode: inductor mode, "default" or "max-autotune-no-cudagraphs"; None = "default" (a first compile
        in minutes; max-autotune benchmarks kernels while compiling: a far longer first compile for
        faster steps).
    inductor_options: inductor config overrides (merged over the mode's); None = on CUDA
        CONV_UNET_INDUCTOR_OPTIONS, plus AUTOTUNE_INDUCTOR_OPTIONS in mode max-autotune-no-cudagraphs;
        none on CPU.
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
    compile_progress: log a line before each compile (what, at which batch size, in which mode, roughly how
        long), a heartbeat while it runs and the measured time after (announce.py); False = silent.
    self_check: compare the first step of the run with the eager float32 step on the same batch
        and stop with one line naming the part and module when they disagree beyond the dtype's
        tolerance (sampling/compiled/self_check.py; costs one eager step on a few images, once per run).
    """

    dtype: str = option("bf16", "--compile-dtype", choices=tuple(DTYPES), help="compiled backend: compute dtype of "
                        "the UNet and encoder copies")
    encoder_dtype: str | None = option(None, "--compile-encoder-dtype", choices=tuple(DTYPES),
                                       default_text="--compile-dtype", help="compute dtype of the VE encoder copy")
    decoder_dtype: str | None = option(None, "--compile-decoder-dtype", choices=tuple(DTYPES),
                                       default_text="the encoder's", help="compute dtype of a latent prior's decoder copy")
    channels_last: bool = option(True, "--no-channels-last", action="store_false",
                                 help="keep the copies in NCHW instead of channels-last memory format")
    compile: bool = option(True, "--no-torch-compile", action="store_false",
                           help="run the low-precision copies without torch.compile (still graph-captured on CUDA)")
    compile_encoder: bool = option(True, "--no-compile-encoder", action="store_false",
                                   help="compile only the UNet, not the encoder / decoder forward")
    backend: str = option("inductor", "--compile-backend", choices=COMPILE_BACKENDS,
                          help="torch.compile backend (aot_eager: no code generation)")
    mode: str | None = option(None, "--compile-mode", choices=COMPILE_MODES, default_text="default",
                              help="inductor mode (max-autotune-no-cudagraphs: a far longer first compile, "
                                   "faster steps)")
    inductor_options: Mapping[str, Any] | None = field(default=None, hash=False)
    cuda_graphs: bool = option(True, "--no-cuda-graphs", action="store_false",
                               help="replay the step without capturing it in a CUDA graph")
    attention: str = option("auto", "--attention", choices=ATTENTION_BACKENDS,
                            help="the UNet's attention kernel (auto: xformers only where measured faster)")
    batch_size: int | None = option(None, help="images per batch (None: chosen from free device memory)")
    memory_fraction: float = option(0.8, "--memory-fraction", parse=float,
                                    help="share of free device memory a chosen batch may use")
    warmup_iterations: int = option(2, "--warmup-iterations", parse=int,
                                    help="step bodies run before a CUDA-graph capture")
    cudnn_benchmark: bool = option(True, "--no-cudnn-benchmark", action="store_false",
                                   help="do not let cuDNN choose convolution algorithms by measurement")
    unet_engine: str | None = option(None, "--unet-engine", metavar="PLAN",
                                     help="a TensorRT engine of this UNet (igds-fast export-unet --engine)")
    compile_progress: bool = option(True, "--no-compile-progress", action="store_false",
                                    help="say nothing about the compile (the line before it, its progress, its time)")
    self_check: bool = option(True, "--no-self-check", action="store_false",
                              help="skip the first step's comparison with the eager float32 step")

    def __post_init__(self):
        for name in ("dtype", "encoder_dtype", "decoder_dtype"):
            value = getattr(self, name)
            if not (value is None and name != "dtype") and value not in DTYPES:
                raise IGDSInputError(f"compile {name} must be one of {tuple(DTYPES)}, got {value!r}")
        for name in ("channels_last", "compile", "compile_encoder", "cuda_graphs", "cudnn_benchmark", "compile_progress",
                     "self_check"):
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
        mode = self.mode or "default"
        options = self.inductor_options
        if options is None:
            options = {}
            if cuda and self.backend == "inductor":
                options = dict(CONV_UNET_INDUCTOR_OPTIONS)
                if mode == "max-autotune-no-cudagraphs":
                    options.update(AUTOTUNE_INDUCTOR_OPTIONS)
        return replace(
            self,
            mode=mode,
            inductor_options=options,
            cuda_graphs=self.cuda_graphs and cuda,
            encoder_dtype=self.encoder_dtype or self.dtype,
            decoder_dtype=self.decoder_dtype or self.encoder_dtype or self.dtype,
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


__all__ = ["ATTENTION_BACKENDS", "AUTOTUNE_INDUCTOR_OPTIONS", "COMPILE_BACKENDS", "COMPILE_MODES",
           "CONV_UNET_INDUCTOR_OPTIONS", "CompileConfig", "DTYPES"]
