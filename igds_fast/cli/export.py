"""`igds-fast export-unet`: the compiled backend's low-precision UNet as ONNX (and a TensorRT engine)."""
from __future__ import annotations

import torch

from igds_fast.errors import IGDSInputError
from igds_fast.export import EXPORT_DTYPES, export_unet_onnx
from igds_fast.models.priors import describe_prior_file, load_prior_unet
from igds_fast.sampling.compiled.tensorrt import build_engine


def add_parser(subparsers) -> None:
    """Declare `igds-fast export-unet` (handler: `run`)."""
    parser = subparsers.add_parser(
        "export-unet",
        help="export the prior UNet to ONNX at one batch size (and build a TensorRT engine from it)",
        description=(
            "Write the compiled backend's low-precision UNet as ONNX at a static batch size, checked "
            "against the float32 UNet with onnxruntime; with --engine, also build a TensorRT engine "
            "for this GPU (needs tensorrt and CUDA), to pass as --compile-options '{\"unet_engine\": PATH}'."
        ),
    )
    parser.add_argument("--prior", required=True, help="ADM checkpoint (with --preset) or a prior file from train-prior")
    parser.add_argument("--preset", default=None, help="architecture of an ADM --prior checkpoint")
    parser.add_argument("--batch-size", type=int, required=True, help="the one batch size the graph/engine runs")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="fp16", help="weight/compute dtype (default: fp16)")
    parser.add_argument("--out", required=True, metavar="UNET.onnx", help="ONNX file to write")
    parser.add_argument("--engine", default=None, metavar="UNET.plan", help="also build a TensorRT engine here")
    parser.add_argument("--workspace-gib", type=float, default=None, help="TensorRT builder workspace limit")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.set_defaults(handler=run)


def run(args) -> int:
    """The `export-unet` subcommand."""
    if args.engine is not None:
        if not torch.cuda.is_available():
            raise IGDSInputError("--engine builds a TensorRT engine for a CUDA GPU; none is available here")
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise IGDSInputError("--engine needs the tensorrt package: pip install tensorrt") from None
    spec = describe_prior_file(args.prior, args.preset)
    if spec.kind == "dit":  # the engine route is ADM's (x0 mode, one UNet call a step); a DiT runs compiled
        raise IGDSInputError("export-unet exports ADM priors; a DiT prior runs on --backend compiled (torch.compile)")
    unet = load_prior_unet(spec, "cpu")
    report = export_unet_onnx(unet, args.out, args.batch_size, args.dtype, check=not args.no_check)
    detail = f", rel. error {report['rel_error']:.1e}" if "rel_error" in report else ""
    print(f"export-unet: {report['path']} ({sum(report['files'].values()) / 2**20:.1f} MiB, {args.dtype}, "
          f"batch {args.batch_size}; check: {report['check']}{detail})")
    if args.engine is not None:
        built = build_engine(args.out, args.engine, args.workspace_gib)
        print(f"export-unet: TensorRT {built['tensorrt']} engine {built['engine']} "
              f"({built['bytes'] / 2**20:.1f} MiB) for {built['device']}")
    return 0
