"""`igds-fast train-ve`: train the variational estimator (MoCo + CMI encoder, linear classifier, centroids)."""
from __future__ import annotations

import argparse
import os
import sys

from igds_fast.data import FolderImages, scan_image_folder
from igds_fast.errors import IGDSInputError
from igds_fast.imageio import write_json_atomic
from igds_fast.models.resnet import NORMS
from igds_fast.train_ve import (
    ARCHS,
    CENTROID_UPDATES,
    CLASSIFIER_OPTIMIZERS,
    OPTIMIZERS,
    VETrainConfig,
    train_ve_from_source,
)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_parser(subparsers) -> None:
    """Declare `igds-fast train-ve` (handler: `run`)."""
    defaults = VETrainConfig()
    parser = subparsers.add_parser(
        "train-ve",
        help="train the variational estimator (MoCo + CMI encoder, linear classifier, centroids)",
        description=(
            "Train the IGDS variational estimator on an ImageFolder (IGDS_SPEC section 2): MoCo v2 "
            "instance discrimination minus lambda * E KL(P_x || Q_y), then a linear classifier on the "
            "frozen features and the class centroids log Q. Writes the VE bundle (safetensors) and "
            "<out>.report.json with the prototype / contextual information estimates."
        ),
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="training set: DIR/<class>/<images>")
    parser.add_argument("--val", default=None, metavar="DIR", help="held-out set of the same classes (report only)")
    parser.add_argument("--out", required=True, metavar="VE_SAFETENSORS", help="where to write the VE bundle")
    parser.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="encoder input side")
    parser.add_argument("--image-size", type=int, default=None, help="side images are loaded at (default: --resolution)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default 3)")
    parser.add_argument("--softplus-beta", type=float, default=defaults.softplus_beta, help="0 = ReLU (default 3.0)")
    parser.add_argument("--norm", choices=NORMS, default=defaults.norm)
    parser.add_argument("--mean", type=_float_list, default=None, help="per-channel mean, [0,1] units (default: auto)")
    parser.add_argument("--std", type=_float_list, default=None, help="per-channel std, [0,1] units (default: auto)")
    parser.add_argument("--tau", type=float, default=defaults.tau, help="temperature of P = softmax(z/tau)")
    parser.add_argument("--lambda", dest="lambda_cmi", type=float, default=defaults.lambda_cmi,
                        help="weight of the CMI term (0 = plain MoCo)")
    parser.add_argument("--centroid-update", choices=CENTROID_UPDATES, default=defaults.centroid_update)
    parser.add_argument("--centroid-momentum", type=float, default=defaults.centroid_momentum)
    parser.add_argument("--moco-dim", type=int, default=defaults.moco_dim)
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size)
    parser.add_argument("--moco-momentum", type=float, default=defaults.moco_momentum)
    parser.add_argument("--moco-temperature", type=float, default=defaults.moco_temperature)
    parser.add_argument("--bn-splits", type=int, default=defaults.bn_splits, help="shuffle-BN groups (1 = off)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="0 = keep the initial encoder")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--crop-scale", type=_float_list, default=defaults.crop_scale, help="low,high area fraction")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flips in the views")
    parser.add_argument("--jitter", type=float, default=defaults.jitter)
    parser.add_argument("--classifier-optimizer", choices=CLASSIFIER_OPTIMIZERS, default=defaults.classifier_optimizer)
    parser.add_argument("--classifier-epochs", type=int, default=defaults.classifier_epochs)
    parser.add_argument("--classifier-lr", type=float, default=defaults.classifier_lr)
    parser.add_argument("--classifier-weight-decay", type=float, default=defaults.classifier_weight_decay)
    parser.add_argument("--keep-bn-stats", action="store_true", help="do not recompute BN statistics on clean images")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--init", default="none", help="'none' or 'moco:PATH' (a MoCo v1/v2 checkpoint)")
    parser.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="per-epoch training state, resumed by a rerun (default: OUT.checkpoint; removed when done)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """`igds-fast train-ve`: load the folders, train, write the bundle and its report atomically."""
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise IGDSInputError(f"output folder {out_folder!r} does not exist")
    config = VETrainConfig(
        arch=args.arch, in_channels=args.channels,
        softplus_beta=None if args.softplus_beta == 0 else args.softplus_beta, norm=args.norm,
        resolution=args.resolution, mean=args.mean, std=args.std, tau=args.tau, moco_dim=args.moco_dim,
        queue_size=args.queue_size, moco_momentum=args.moco_momentum, moco_temperature=args.moco_temperature,
        bn_splits=args.bn_splits, lambda_cmi=args.lambda_cmi, centroid_update=args.centroid_update,
        centroid_momentum=args.centroid_momentum, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, crop_scale=args.crop_scale,
        horizontal_flip=not args.no_flip, jitter=args.jitter, classifier_optimizer=args.classifier_optimizer,
        classifier_epochs=args.classifier_epochs, classifier_lr=args.classifier_lr,
        classifier_weight_decay=args.classifier_weight_decay, recompute_bn_stats=not args.keep_bn_stats,
        seed=args.seed, device=args.device, init=args.init,
    )
    image_size = args.image_size if args.image_size is not None else args.resolution
    checkpoint = args.checkpoint if args.checkpoint is not None else args.out + ".checkpoint"
    # Structure of both trees first (cheap), then one decoding pass each (corrupt files; the pixel
    # statistics). Large sets are streamed from here on, small ones held (IGDS_IN_MEMORY_MB).
    class_names, _ = scan_image_folder(args.data)
    if args.val is not None:
        scan_image_folder(args.val, class_names, ignore_unlisted=True)
    train = FolderImages(args.data, image_size, channels=args.channels, on_corrupt=args.on_corrupt,
                         class_names=class_names, progress=not args.quiet)
    val = None
    if args.val is not None:
        val = FolderImages(args.val, image_size, channels=args.channels, on_corrupt=args.on_corrupt,
                           class_names=class_names, ignore_unlisted=True, progress=not args.quiet)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    ve, report = train_ve_from_source(train, class_names, config, val, log=log, checkpoint=checkpoint,
                                      progress=not args.quiet)
    ve.save(args.out)
    report["data_dir"] = os.path.abspath(args.data)
    report["val_dir"] = None if args.val is None else os.path.abspath(args.val)
    report["bundle"] = os.path.abspath(args.out)
    report["train_load"] = {k: v for k, v in train.report.to_dict().items() if k != "skipped_paths"}
    report["streamed"] = not train.in_memory
    write_json_atomic(args.out + ".report.json", report)
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)  # the bundle is written: nothing left to resume
    print(f"VE written to {args.out} (report: {args.out}.report.json)")
    return 0
