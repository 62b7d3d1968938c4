"""`igds-fast calibrate-beta`: choose beta per IPC by training on weighted real subsets (IGDS_SPEC section 6).

Its flags are generated from `CalibrateRun` and the `CalibrationSettings` it holds (igds_fast/calibrate.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from igds_fast.calibrate import CalibrateRun, calibrate_beta
from igds_fast.data import FolderImages, scan_image_folder
from igds_fast.imageio import check_output_file
from igds_fast.guidance.beta_table import write_beta_table
from igds_fast.overlap import check_apart
from igds_fast.settings import add_arguments, from_args, to_dict
from igds_fast.training_cost import announce_calibration
from igds_fast.ve import VariationalEstimator

SETTINGS = CalibrateRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast calibrate-beta` (handler: `run`)."""
    parser = subparsers.add_parser(
        "calibrate-beta",
        allow_abbrev=False,
        help="choose beta per IPC by training on real subsets drawn with p ∝ exp(beta * KL score)",
        description=(
            "IGDS beta calibration (spec section 6, paper Appendix A): drop training images the VE "
            "misclassifies, score each by KL(P_x || Q_y), draw IPC images per class without "
            "replacement with p ∝ exp(beta * score), train NETWORK on each subset, test on --val, "
            "keep the best beta per IPC (ties -> smaller). Class order is the VE's."
        ),
    )
    add_arguments(parser, CalibrateRun)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """`igds-fast calibrate-beta`: build the settings tree, load, calibrate, write the beta table atomically."""
    settings = from_args(CalibrateRun, args)
    check_apart([("--out", settings.out)], [("--data", settings.data), ("--val", settings.val), ("--ve", settings.ve)])
    check_output_file(settings.out)  # before the calibration's training, not after it
    ve = VariationalEstimator.load(settings.ve)
    class_names = list(ve.class_names)
    # Structure first (cheap): the VE's classes must all be there; extra folders are not used.
    scan_image_folder(settings.data, class_names, ignore_unlisted=True)
    scan_image_folder(settings.val, class_names, ignore_unlisted=True)
    image_size = settings.image_size if settings.image_size is not None else ve.resolution
    channels = ve.encoder.in_channels
    # One decoding pass each (corrupt files); large sets are then streamed, small ones held.
    train, val = (FolderImages(folder, image_size, channels=channels, on_corrupt=settings.on_corrupt,
                               class_names=class_names, ignore_unlisted=True, progress=settings.progress)
                  for folder in (settings.data, settings.val))
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if settings.progress else (lambda message: None)
    announce_calibration(settings.calibration, ve, len(train), len(val), image_size,
                         lambda message: print(message, file=sys.stderr, flush=True))
    result = calibrate_beta(train, None, val, None, ve, log=log, **settings.calibration.keywords())
    result["settings"].update(data_dir=os.path.abspath(settings.data), val_dir=os.path.abspath(settings.val),
                              ve=os.path.abspath(settings.ve), command=to_dict(settings))
    write_beta_table(settings.out, result)
    for ipc, beta in result["chosen"].items():
        print(f"IPC {ipc}: beta {beta:g}")
    print(f"beta table written to {settings.out}")
    return 0
