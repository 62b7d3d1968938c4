"""ONNX export of the prior UNet, the input of a TensorRT engine (igds_fast.sampling.compiled.tensorrt).

    export_unet_onnx(unet, "unet_b32.onnx", batch_size=32, dtype="fp16")

The exported graph is the compiled backend's low-precision UNet (`LowPrecisionUNet`): the same
casts inside, so its interface is the float32 one the sampler uses, at one static batch size —
a TensorRT engine, like a captured CUDA graph, is built for one shape:

    x           [B, C, H, W] float32    x_t
    timesteps   [B]          int64      the ORIGINAL timesteps (timestep_map[i]), as the UNet takes
    y           [B]          int64      prior class labels (class-conditional priors only)
    -> model_output [B, C or 2C, H, W] float32

Weights are stored in `dtype` (fp16 halves the file and is what TensorRT runs; GroupNorm statistics
stay fp32 because ADM's GroupNorm32 computes in fp32 and the export records those casts). Models
over ONNX's 2 GiB protobuf limit (adm256 in fp32) keep their weights in `PATH.data` beside the
graph. Files are written atomically: a half-written export never carries the final name.

Checks (`check=True`, before the files take their final names): onnx.checker, then — when
onnxruntime is installed — the graph run by onnxruntime (CPU) against the user's float32 UNet on
fresh random inputs, relative L2 error within CHECK_TOLERANCES (fp32: the same math reordered;
fp16: one fp16 rounding per layer, ~4e-4 measured on a small ADM). onnxruntime has no bf16
convolutions: a bf16 export is checked for structure only.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import IGDSInputError
from .settings import option
from .sampling.compiled.config import DTYPES
from .sampling.compiled.low_precision import LowPrecisionUNet, low_precision_copy

ONNX_OPSET = 18
CHECK_TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}  # relative L2 error vs the float32 UNet
EXTERNAL_DATA_BYTES = 1800 << 20  # below protobuf's 2 GiB limit, with room for the graph itself
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
INPUT_NAMES = ("x", "timesteps", "y")
OUTPUT_NAME = "model_output"


class ExportCheckError(RuntimeError):
    """The written ONNX graph does not compute what the UNet computes (nothing is left at PATH)."""


def unet_export_inputs(unet: nn.Module, batch_size: int, device="cpu", generator=None) -> tuple:
    """Random example inputs (x, timesteps[, y]) of the exported interface at `batch_size`."""
    size, channels = int(unet.image_size), int(unet.in_channels)
    x = torch.randn(batch_size, channels, size, size, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    if getattr(unet, "num_classes", None) is None:
        return x, timesteps
    y = torch.randint(0, int(unet.num_classes), (batch_size,), generator=generator).to(device)
    return x, timesteps, y


def _check_export_arguments(unet, path: str, batch_size: int, dtype: str) -> None:
    for name in ("image_size", "in_channels"):
        if not hasattr(unet, name):
            raise IGDSInputError(f"the UNet to export has no attribute {name!r} (an igds_fast prior is expected)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IGDSInputError(f"batch size must be a positive integer, got {batch_size!r}")
    if dtype not in EXPORT_DTYPES:
        raise IGDSInputError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if not str(path).endswith(".onnx"):
        raise IGDSInputError(f"the ONNX file name must end in .onnx, got {path!r}")
    if os.path.isdir(path):
        raise IGDSInputError(f"{path!r} is a folder, not an ONNX file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise IGDSInputError(f"the folder of {path!r} does not exist")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise IGDSInputError(f"ONNX export needs the onnx extra: pip install 'igds-fast[onnx]' ({error.name} missing)")


def export_unet_onnx(unet: nn.Module, path: str, batch_size: int, dtype: str = "fp16", check: bool = True) -> dict:
    """Write `unet`'s low-precision copy as ONNX at a static batch size; returns a report dict.

    The user's module is not modified. Report: path, files (with bytes), dtype, batch_size, inputs,
    output_shape, check ("onnxruntime" with max_rel_error, or "structure").
    """
    _check_export_arguments(unet, path, batch_size, dtype)
    path = os.path.abspath(path)
    copy = LowPrecisionUNet(low_precision_copy(unet, DTYPES[dtype], channels_last=False), DTYPES[dtype], False)
    copy = copy.to("cpu")
    inputs = unet_export_inputs(unet, batch_size)
    names = list(INPUT_NAMES[: len(inputs)])
    weight_bytes = sum(t.numel() * t.element_size() for t in copy.state_dict().values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    folder, name = os.path.split(path)
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    try:
        staged = os.path.join(staging, name)
        with torch.no_grad():
            torch.onnx.export(copy, inputs, staged, input_names=names, output_names=[OUTPUT_NAME],
                              opset_version=ONNX_OPSET, dynamo=True, external_data=external)
        produced = sorted(os.listdir(staging))
        report = {"path": path, "dtype": dtype, "batch_size": batch_size, "inputs": names,
                  "external_data": external}
        if check:
            report.update(_check_onnx(staged, unet, inputs, names, dtype))
        # The graph is renamed last: while it is absent, no reader takes a half-written export.
        for produced_name in sorted(produced, key=lambda n: n == name):
            os.replace(os.path.join(staging, produced_name), os.path.join(folder, produced_name))
        report["files"] = {n: os.path.getsize(os.path.join(folder, n)) for n in produced}
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_onnx(path: str, unet: nn.Module, inputs: tuple, names: list[str], dtype: str) -> dict:
    import onnx

    onnx.checker.check_model(path)  # by path: works above 2 GiB with external data
    device = next(unet.parameters()).device
    with torch.no_grad():
        expected = unet(*(t.to(device) for t in inputs)).float().cpu()
    found = {"output_shape": list(expected.shape)}
    try:
        import onnxruntime
    except ImportError:
        return {**found, "check": "structure (onnxruntime not installed)"}
    if dtype not in CHECK_TOLERANCES:
        return {**found, "check": f"structure (onnxruntime has no {dtype} convolutions)"}
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    actual = torch.from_numpy(actual)
    if actual.shape != expected.shape or not torch.isfinite(actual).all():
        raise ExportCheckError(f"the ONNX graph gives shape {tuple(actual.shape)} (finite: "
                               f"{bool(torch.isfinite(actual).all())}), expected {tuple(expected.shape)}")
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    if error > CHECK_TOLERANCES[dtype]:
        raise ExportCheckError(
            f"the ONNX graph differs from the float32 UNet: relative error {error:.2e} > {CHECK_TOLERANCES[dtype]:g}"
        )
    return {**found, "check": "onnxruntime", "rel_error": error}




@dataclass(frozen=True, kw_only=True)
class ExportUnetRun:
    """`igds-fast export-unet`: which prior, at which batch size and dtype, to which files."""

    prior: str = option(flag="--prior", help="ADM checkpoint (with --arch) or a prior file from train-prior")
    arch: str | None = option(None, "--arch", old=("--preset",), help="the architecture of an ADM --prior checkpoint")
    batch_size: int = option(flag="--batch-size", parse=int, help="the one batch size the graph / engine runs")
    dtype: str = option("fp16", "--dtype", choices=EXPORT_DTYPES, help="weight and compute dtype")
    out: str = option(flag="--out", metavar="UNET.onnx", help="the ONNX file to write")
    engine: str | None = option(None, "--engine", metavar="UNET.plan", help="also build a TensorRT engine here")
    workspace_gib: float | None = option(None, "--workspace-gib", parse=float, default_text="TensorRT's",
                                         help="TensorRT builder workspace limit")
    check: bool = option(True, "--no-check", action="store_false", help="skip the onnxruntime comparison")

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise IGDSInputError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if self.workspace_gib is not None:
            if self.engine is None:
                raise IGDSInputError("--workspace-gib applies to building a TensorRT engine (--engine)")
            if not self.workspace_gib > 0 or self.workspace_gib == float("inf"):
                raise IGDSInputError(f"--workspace-gib must be a positive number, got {self.workspace_gib!r}")


__all__ = ["EXPORT_DTYPES", "ExportCheckError", "ExportUnetRun", "INPUT_NAMES", "OUTPUT_NAME", "export_unet_onnx",
           "unet_export_inputs"]
