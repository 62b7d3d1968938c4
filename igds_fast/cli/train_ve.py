"""`igds-fast train-ve`: train the variational estimator (MoCo + CMI encoder, linear classifier, centroids).

Its flags are generated from `VETrainRun` and the `VETrainConfig` it holds (igds_fast/train_ve/config.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from igds_fast.data import FolderImages, scan_image_folder
from igds_fast.imageio import check_output_file, write_json_atomic
from igds_fast.limits import check_disk
from igds_fast.models.resnet import FEATURE_DIMS
from igds_fast.overlap import check_apart
from igds_fast.settings import add_arguments, from_args, to_dict
from igds_fast.train_ve import VETrainRun, stage_files, train_ve_from_source

SETTINGS = VETrainRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast train-ve` (handler: `run`)."""
    parser = subparsers.add_parser(
        "train-ve",
        allow_abbrev=False,
        help="train the variational estimator (MoCo + CMI encoder, linear classifier, centroids)",
        description=(
            "Train the IGDS variational estimator on an ImageFolder (IGDS_SPEC section 2): MoCo v2 "
            "instance discrimination minus lambda * E KL(P_x || Q_y), then a linear classifier on the "
            "frozen features and the class centroids log Q. Writes the VE bundle (safetensors) and "
            "<out>.report.json with the prototype / contextual information estimates."
        ),
    )
    add_arguments(parser, VETrainRun)
    parser.set_defaults(handler=run, interrupted="rerun the same command to resume after the last finished epoch "
                        "(OUT.checkpoint) or the classifier stage's last save (OUT.checkpoint.classifier)")


def run(args: argparse.Namespace) -> int:
    """`igds-fast train-ve`: load the folders, train, write the bundle and its report atomically."""
    settings = from_args(VETrainRun, args)
    # Its files never inside the image folders it reads (igds_fast/overlap.py), and each checked before any
    # decoding or training (an existing folder, a dangling link, a read-only folder would otherwise fail
    # after the training).
    features_file, stage_file = stage_files(settings.checkpoint_path)
    check_apart([("--out", settings.out), ("--out", settings.out + ".report.json"),
                 ("--checkpoint", settings.checkpoint_path), ("--checkpoint", features_file),
                 ("--checkpoint", stage_file)], [("--data", settings.data), ("--val", settings.val)])
    check_output_file(settings.out)
    check_output_file(settings.out + ".report.json", "--out")
    for path in (settings.checkpoint_path, features_file, stage_file):
        check_output_file(path, "--checkpoint")
    config, channels, checkpoint = settings.training, settings.training.in_channels, settings.checkpoint_path
    # Structure of both trees first (cheap), then one decoding pass each (corrupt files; the pixel
    # statistics). Large sets are streamed from here on, small ones held (IGDS_IN_MEMORY_MB).
    class_names, train_paths = scan_image_folder(settings.data)
    # The classifier stage writes every training image's features, float32 [N, d], to CKPT.features
    # (removed when the report is made); nothing of that size is held in memory.
    count = sum(len(paths) for paths in train_paths)
    if not os.path.exists(features_file):
        check_disk(4 * count * FEATURE_DIMS[config.arch], features_file,
                   f"the linear probe's features of {count} images ({config.arch}: {FEATURE_DIMS[config.arch]} each, "
                   f"float32, in {features_file})")
    if settings.val is not None:
        scan_image_folder(settings.val, class_names, ignore_unlisted=True)
    train = FolderImages(settings.data, settings.load_size, channels=channels, on_corrupt=settings.on_corrupt,
                         class_names=class_names, progress=settings.progress)
    val = None
    if settings.val is not None:
        val = FolderImages(settings.val, settings.load_size, channels=channels, on_corrupt=settings.on_corrupt,
                           class_names=class_names, ignore_unlisted=True, progress=settings.progress)
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if settings.progress else (lambda message: None)
    ve, report = train_ve_from_source(train, class_names, config, val, log=log, checkpoint=checkpoint,
                                      progress=settings.progress)
    ve.save(settings.out)
    report["data_dir"] = os.path.abspath(settings.data)
    report["val_dir"] = None if settings.val is None else os.path.abspath(settings.val)
    report["bundle"] = os.path.abspath(settings.out)
    report["train_load"] = {k: v for k, v in train.report.to_dict().items() if k != "skipped_paths"}
    report["streamed"] = not train.in_memory
    report["settings"] = to_dict(settings)
    write_json_atomic(settings.out + ".report.json", report)
    for path in (checkpoint, features_file, stage_file):
        if os.path.exists(path):
            os.unlink(path)  # the bundle is written: nothing left to resume
    print(f"VE written to {settings.out} (report: {settings.out}.report.json)")
    return 0
