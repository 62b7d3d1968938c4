"""`igds-fast export-npz`: a distilled folder as one .npz in guided-diffusion's evaluator format."""
from __future__ import annotations

import argparse

from igds_fast.imageio import check_output_file
from igds_fast.npz import ExportNpzRun, export_npz
from igds_fast.settings import add_arguments, from_args

SETTINGS = ExportNpzRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast export-npz` (handler: `run`)."""
    parser = subparsers.add_parser(
        "export-npz",
        allow_abbrev=False,
        help="write a distilled folder as one .npz (arr_0 images, arr_1 labels) for guided-diffusion's evaluator",
        description=(
            "Write the images of a finished `igds-fast distill` folder, in its manifest's order, as arr_0 "
            "(uint8 [N, H, W, 3]) and their classes as arr_1 (the prior's class, i.e. the ImageNet index for "
            "ImageNet priors; the VE's for unconditional priors) — the format of guided-diffusion's "
            "evaluations/evaluator.py. Streamed: memory holds one image at a time."
        ),
    )
    add_arguments(parser, ExportNpzRun)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = from_args(ExportNpzRun, args)
    check_output_file(settings.out)
    report = export_npz(settings.folder, settings.out, force=settings.force)
    print(f"export-npz: {report['images']} images {tuple(report['shape'][1:])} -> {report['path']}")
    return 0
