"""`igds-fast export-npz`: a distilled folder as one .npz in guided-diffusion's evaluator format."""
from __future__ import annotations

import argparse

from igds_fast.npz import export_npz


def add_parser(subparsers) -> None:
    """Declare `igds-fast export-npz` (handler: `run`)."""
    parser = subparsers.add_parser(
        "export-npz",
        help="write a distilled folder as one .npz (arr_0 images, arr_1 labels) for guided-diffusion's evaluator",
        description=(
            "Write the images of a finished `igds-fast distill` folder, in its manifest's order, as arr_0 "
            "(uint8 [N, H, W, 3]) and their classes as arr_1 (the prior's class, i.e. the ImageNet index for "
            "ImageNet priors; the VE's for unconditional priors) — the format of guided-diffusion's "
            "evaluations/evaluator.py. Streamed: memory holds one image at a time."
        ),
    )
    parser.add_argument("folder", metavar="DISTILLED_DIR", help="a folder written by igds-fast distill")
    parser.add_argument("--out", required=True, metavar="SAMPLES.npz", help="the .npz to write (atomically)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report = export_npz(args.folder, args.out)
    print(f"export-npz: {report['images']} images {tuple(report['shape'][1:])} -> {report['path']}")
    return 0
