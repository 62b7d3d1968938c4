"""`igds-fast export-unet`: the compiled backend's low-precision UNet as ONNX (and a TensorRT engine).

Its flags are generated from `ExportUnetRun` (igds_fast/export.py).
"""
from __future__ import annotations

import torch

from igds_fast.errors import IGDSInputError
from igds_fast.imageio import check_output_file
from igds_fast.overlap import check_apart
from igds_fast.export import ExportUnetRun, export_unet_onnx
from igds_fast.models.priors import describe_prior_file, load_prior_unet
from igds_fast.sampling.compiled.tensorrt import build_engine
from igds_fast.settings import add_arguments, from_args

SETTINGS = ExportUnetRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast export-unet` (handler: `run`)."""
    parser = subparsers.add_parser(
        "export-unet",
        allow_abbrev=False,
        help="export the prior UNet to ONNX at one batch size (and build a TensorRT engine from it)",
        description=(
            "Write the compiled backend's low-precision UNet as ONNX at a static batch size, checked "
            "against the float32 UNet with onnxruntime; with --engine, also build a TensorRT engine "
            "for this GPU (needs tensorrt and CUDA), to pass as --unet-engine PATH."
        ),
    )
    add_arguments(parser, ExportUnetRun)
    parser.set_defaults(handler=run)


def run(args) -> int:
    """The `export-unet` subcommand."""
    settings = from_args(ExportUnetRun, args)
    # Before the export's minutes: the files it writes, apart from each other and from the checkpoint.
    check_apart([("--out", settings.out), ("--engine", settings.engine)], [("--prior", settings.prior)])
    check_output_file(settings.out, "--out")
    if settings.engine is not None:
        check_output_file(settings.engine, "--engine")
        if not torch.cuda.is_available():
            raise IGDSInputError("--engine builds a TensorRT engine for a CUDA GPU; none is available here")
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise IGDSInputError("--engine needs the tensorrt package: pip install tensorrt") from None
    spec = describe_prior_file(settings.prior, settings.arch)
    if spec.kind == "dit":  # the engine route is ADM's (x0 mode, one UNet call a step); a DiT runs compiled
        raise IGDSInputError("export-unet exports ADM priors; a DiT prior runs on --backend compiled (torch.compile)")
    unet = load_prior_unet(spec, "cpu")
    report = export_unet_onnx(unet, settings.out, settings.batch_size, settings.dtype, check=settings.check)
    detail = f", rel. error {report['rel_error']:.1e}" if "rel_error" in report else ""
    print(f"export-unet: {report['path']} ({sum(report['files'].values()) / 2**20:.1f} MiB, {settings.dtype}, "
          f"batch {settings.batch_size}; check: {report['check']}{detail})")
    if settings.engine is not None:
        built = build_engine(settings.out, settings.engine, settings.workspace_gib)
        print(f"export-unet: TensorRT {built['tensorrt']} engine {built['engine']} "
              f"({built['bytes'] / 2**20:.1f} MiB) for {built['device']}")
    return 0
