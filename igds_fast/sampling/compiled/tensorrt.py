"""A TensorRT engine as the compiled backend's UNet (optional; needs `pip install tensorrt` and CUDA).

    igds-fast export-unet --prior 256x256_diffusion.pt --preset adm256-cond --batch-size 32 \\
        --dtype fp16 --out unet_b32.onnx --engine unet_b32.plan
    igds-fast distill ... --backend compiled --batch-size 32 --compile-options '{"unet_engine": "unet_b32.plan"}'

The engine is built from `igds_fast.export.export_unet_onnx`'s graph as a STRONGLY TYPED network:
TensorRT keeps the ONNX graph's types (fp16 weights and activations, GroupNorm statistics in fp32 as
ADM's GroupNorm32 computes them) instead of choosing precisions itself. Its interface is the
float32 one the sampler uses (x, timesteps[, y]) -> model_output, at the one batch size it was
built for. In the compiled step it replaces only the torch.compile'd UNet: the encoder, Triton
head and update stay, and the whole step is still captured in one CUDA graph (the engine is run
during the warm-up before capture, which TensorRT asks for). Guidance mode "x0" only: mode "xt"
differentiates through the UNet, which an inference engine cannot.
"""
from __future__ import annotations

import os
import tempfile

import torch

from ...errors import IGDSInputError

ENGINE_OUTPUT = "model_output"


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise IGDSInputError("a TensorRT UNet engine needs the tensorrt package: pip install tensorrt") from None
    return tensorrt


def build_engine(onnx_path: str, engine_path: str, workspace_gib: float | None = None) -> dict:
    """Build and write (atomically) a TensorRT engine for this GPU from an exported UNet ONNX file."""
    if not os.path.isfile(onnx_path):
        raise IGDSInputError(f"ONNX file not found: {onnx_path}")
    if not torch.cuda.is_available():
        raise IGDSInputError("building a TensorRT engine needs a CUDA GPU (the engine is specific to it)")
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):  # reads PATH.data beside it, if any
        first = str(parser.get_error(0)) if parser.num_errors else "unknown error"
        raise IGDSInputError(f"TensorRT cannot parse {onnx_path}: {first.splitlines()[0]}")
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT did not build the engine (its log above says why)")
    folder = os.path.dirname(os.path.abspath(engine_path))
    handle, temporary = tempfile.mkstemp(prefix=".engine.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(memoryview(serialized))
        os.replace(temporary, engine_path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return {"engine": os.path.abspath(engine_path), "bytes": os.path.getsize(engine_path),
            "tensorrt": trt.__version__, "device": torch.cuda.get_device_name()}


class TensorRTUNet:
    """(x [B, C, H, W] fp32, timesteps [B], y [B] or None) -> model_output [B, C or 2C, H, W] fp32.

    Runs the engine on the current CUDA stream (capturable in a CUDA graph once it has run once).
    Attributes: batch_size, input_shape (C, H, W), output_channels, conditional.
    """

    def __init__(self, engine_path: str, device):
        device = torch.device(device)
        if device.type != "cuda":
            raise IGDSInputError("a TensorRT UNet engine runs on a CUDA device only")
        if not os.path.isfile(engine_path):
            raise IGDSInputError(f"TensorRT engine not found: {engine_path}")
        trt = _import_tensorrt()
        self._trt = trt
        self.device = device
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(engine_path, "rb") as handle:
            blob = handle.read()
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise IGDSInputError(f"{engine_path} is not an engine this TensorRT and GPU can load")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        self.input_names = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        if sorted(self.input_names) not in (["timesteps", "x"], ["timesteps", "x", "y"]) or outputs != [ENGINE_OUTPUT]:
            raise IGDSInputError(
                f"{engine_path} is not an igds UNet engine: inputs {self.input_names}, outputs {outputs} "
                "(build it with igds-fast export-unet)"
            )
        self.shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        if any(d < 0 for shape in self.shapes.values() for d in shape):
            raise IGDSInputError(f"{engine_path} has dynamic shapes; build it at one batch size")
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.batch_size = self.shapes["x"][0]
        self.input_shape = self.shapes["x"][1:]
        self.output_channels = self.shapes[ENGINE_OUTPUT][1]
        self.conditional = "y" in self.input_names

    def _torch_dtype(self, trt_dtype) -> torch.dtype:
        table = {
            self._trt.DataType.FLOAT: torch.float32,
            self._trt.DataType.HALF: torch.float16,
            self._trt.DataType.INT32: torch.int32,
            self._trt.DataType.INT64: torch.int64,
        }
        if trt_dtype not in table:
            raise IGDSInputError(f"unsupported engine tensor type {trt_dtype}")
        return table[trt_dtype]

    def check_matches(self, batch_size: int | None, channels: int, image_size: int, learn_sigma: bool,
                      conditional: bool) -> None:
        """One-line IGDSInputError when the engine was built for another UNet or batch size."""
        if batch_size is not None and batch_size != self.batch_size:
            raise IGDSInputError(f"the TensorRT engine is built for batch {self.batch_size}, not {batch_size}")
        if self.input_shape != (channels, image_size, image_size):
            raise IGDSInputError(f"the TensorRT engine takes images {self.input_shape}, the prior makes "
                                 f"{(channels, image_size, image_size)}")
        expected = channels * (2 if learn_sigma else 1)
        if self.output_channels != expected:
            raise IGDSInputError(f"the TensorRT engine outputs {self.output_channels} channels, the prior {expected}")
        if self.conditional != conditional:
            raise IGDSInputError("the TensorRT engine and the prior differ in class conditioning")

    def __call__(self, x, timesteps, y=None) -> torch.Tensor:
        if tuple(x.shape) != self.shapes["x"]:
            raise IGDSInputError(f"the TensorRT engine takes x of shape {self.shapes['x']}, got {tuple(x.shape)}")
        feeds = {
            "x": x.to(self.dtypes["x"]).contiguous(),
            "timesteps": timesteps.to(self.dtypes["timesteps"]).expand(self.batch_size).contiguous(),
        }
        if self.conditional:
            if y is None:
                raise IGDSInputError("the TensorRT engine is class-conditional: labels are required")
            feeds["y"] = y.to(self.dtypes["y"]).contiguous()
        out = torch.empty(self.shapes[ENGINE_OUTPUT], device=x.device, dtype=self.dtypes[ENGINE_OUTPUT])
        for name, tensor in feeds.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(ENGINE_OUTPUT, out.data_ptr())
        # The feeds live until the next allocation on this stream reuses them, which is ordered after
        # the engine's kernels: the caching allocator's stream semantics keep them valid.
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the UNet engine")
        return out.float()


def engine_unet(config, context) -> TensorRTUNet:
    """The TensorRT engine of CompileConfig.unet_engine, checked against the prior of the step context."""
    if context.guidance_config.mode != "x0":
        raise IGDSInputError("a TensorRT UNet engine supports guidance mode x0 only (mode xt needs UNet gradients)")
    if context.device.type != "cuda":
        raise IGDSInputError("a TensorRT UNet engine runs on a CUDA device only")
    engine = TensorRTUNet(config.unet_engine, context.device)
    engine.check_matches(config.batch_size, context.channels, context.image_size, context.learn_sigma,
                         context.conditional)
    return engine


__all__ = ["TensorRTUNet", "build_engine", "engine_unet"]
