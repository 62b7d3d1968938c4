"""`igds-fast calibrate-beta`: choose beta per IPC by training on weighted real subsets (IGDS_SPEC section 6)."""
from __future__ import annotations

import argparse
import os
import sys

from igds_fast.calibrate import SCORE_NORMALIZATIONS, calibrate_beta, parse_betas, parse_ipcs
from igds_fast.guidance.beta_table import write_beta_table
from igds_fast.data import FolderImages, scan_image_folder
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.augment import AugmentConfig
from igds_fast.ve import VariationalEstimator


def add_parser(subparsers) -> None:
    """Declare `igds-fast calibrate-beta` (handler: `run`)."""
    parser = subparsers.add_parser(
        "calibrate-beta",
        help="choose beta per IPC by training on real subsets drawn with p ∝ exp(beta * KL score)",
        description=(
            "IGDS beta calibration (spec section 6, paper Appendix A): drop training images the VE "
            "misclassifies, score each by KL(P_x || Q_y), draw IPC images per class without "
            "replacement with p ∝ exp(beta * score), train NETWORK on each subset, test on --val, "
            "keep the best beta per IPC (ties -> smaller). Class order is the VE's."
        ),
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="real training set: DIR/<class>/<images>")
    parser.add_argument("--val", required=True, metavar="DIR", help="real held-out set of the same classes")
    parser.add_argument("--ve", required=True, metavar="VE_SAFETENSORS", help="the VE bundle (igds-fast train-ve)")
    parser.add_argument("--ipc", required=True, help="comma-separated IPCs, e.g. 1,10,50")
    parser.add_argument("--betas", required=True, help="comma-separated beta grid, e.g. 0,0.01,0.1,1")
    parser.add_argument("--out", required=True, metavar="BETA_JSON", help="where to write the beta table")
    parser.add_argument("--network", default="convnet3", help="evaluation network (default: convnet3)")
    parser.add_argument("--epochs", type=int, default=None, help="default: by IPC (the evaluation protocol)")
    parser.add_argument("--seeds", type=int, default=1, help="subsets (and networks) per grid cell (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="side images are loaded at (default: the VE's resolution)")
    parser.add_argument("--width", type=int, default=128, help="ConvNet channels (default 128)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flips when training (e.g. digits)")
    parser.add_argument("--cutmix-prob", type=float, default=1.0)
    parser.add_argument("--score-normalization", choices=SCORE_NORMALIZATIONS, default="none")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """`igds-fast calibrate-beta`: validate, load, calibrate, write the beta table atomically."""
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise IGDSInputError(f"output folder {out_folder!r} does not exist")
    ipcs = parse_ipcs(args.ipc)
    betas = parse_betas(args.betas)
    if args.seeds < 1:
        raise IGDSInputError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        raise IGDSInputError(f"--epochs must be >= 1, got {args.epochs}")
    ve = VariationalEstimator.load(args.ve)
    augment = AugmentConfig(horizontal_flip=not args.no_flip, cutmix_prob=args.cutmix_prob)
    class_names = list(ve.class_names)
    # Structure first (cheap): the VE's classes must all be there; extra folders are not used.
    scan_image_folder(args.data, class_names, ignore_unlisted=True)
    scan_image_folder(args.val, class_names, ignore_unlisted=True)
    image_size = args.image_size if args.image_size is not None else ve.resolution
    channels = ve.encoder.in_channels
    # One decoding pass each (corrupt files); large sets are then streamed, small ones held.
    train = FolderImages(args.data, image_size, channels=channels, on_corrupt=args.on_corrupt,
                         class_names=class_names, ignore_unlisted=True, progress=not args.quiet)
    val = FolderImages(args.val, image_size, channels=channels, on_corrupt=args.on_corrupt,
                       class_names=class_names, ignore_unlisted=True, progress=not args.quiet)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = calibrate_beta(
        train, None, val, None, ve, ipcs, betas, network=args.network, epochs=args.epochs,
        seeds=args.seeds, seed=args.seed, log=log, score_normalization=args.score_normalization,
        device=args.device, augment=augment, width=args.width, lr=args.lr,
    )
    result["settings"].update(data_dir=os.path.abspath(args.data), val_dir=os.path.abspath(args.val),
                              ve=os.path.abspath(args.ve))
    write_beta_table(args.out, result)
    for ipc, beta in result["chosen"].items():
        print(f"IPC {ipc}: beta {beta:g}")
    print(f"beta table written to {args.out}")
    return 0
