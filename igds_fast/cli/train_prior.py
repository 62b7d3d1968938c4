"""`igds-fast train-prior`: train a small ADM DDPM prior on an image folder (or the digits); save it.

Its flags are generated from `PriorTrainRun` and the `PriorTrainConfig` it holds (igds_fast/train_prior.py).
"""
from __future__ import annotations

import os
import sys

from igds_fast.data import load_digits_split, load_image_folder, scan_image_folder
from igds_fast.devices import resolve_device
from igds_fast.imageio import check_output_file
from igds_fast.limits import check_fits
from igds_fast.models.priors import save_prior
from igds_fast.overlap import check_apart
from igds_fast.presets.digits import CLASS_NAMES as DIGIT_CLASSES
from igds_fast.presets.digits import SPLIT as DIGITS_SPLIT
from igds_fast.settings import add_arguments, from_args, to_dict
from igds_fast.threads import pinned_threads, torch_threads
from igds_fast.train_prior import PriorTrainRun, train_prior

SETTINGS = PriorTrainRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast train-prior` (sets handler=run)."""
    parser = subparsers.add_parser(
        "train-prior",
        allow_abbrev=False,
        help="train a small ADM DDPM prior on an image folder (or the built-in digits)",
        description=(
            "Train an ADM-architecture DDPM (eps-prediction MSE + the hybrid VB term for the learned "
            "variance, AdamW, EMA) and save it as one safetensors file usable as `distill --prior FILE`. "
            "The file records the training settings and the data it saw."
        ),
    )
    add_arguments(parser, PriorTrainRun)
    parser.set_defaults(handler=run)


def run(args) -> int:
    """The `train-prior` subcommand: load data, train, save atomically; returns the exit code."""
    settings = from_args(PriorTrainRun, args)
    check_apart([("--out", settings.out)], [("--data", settings.data)])
    check_output_file(settings.out)  # before the training, not after it
    device = resolve_device(settings.device)
    channels = 3 if settings.channels is None else settings.channels
    if not settings.digits:  # the folder is held in memory as float32 [N, C, S, S]: it must fit
        _, paths = scan_image_folder(settings.data)
        count = sum(len(class_paths) for class_paths in paths)
        check_fits(4 * count * channels * settings.image_size ** 2, "cpu",
                   f"holding {count} images of {channels}x{settings.image_size}x{settings.image_size}")
    config = settings.training
    with torch_threads(pinned_threads(settings.cpu_threads, device)):
        if settings.digits:
            split = {**DIGITS_SPLIT, "image_size": settings.image_size}
            images, labels, _, _ = load_digits_split(**split)
            class_names, data = list(DIGIT_CLASSES), {"digits": split}
        else:
            images, labels, class_names, _ = load_image_folder(settings.data, settings.image_size,
                                                               channels=channels)
            data = {"folder": os.path.abspath(settings.data)}

        def progress(step, steps, loss):
            print(f"train-prior: step {step}/{steps} loss {loss:.4f}", file=sys.stderr, flush=True)

        unet, schedule_config, report = train_prior(images, labels, class_names, config, device=device,
                                                    progress=progress)
    flags = config.unet_flags(images.shape[-1], images.shape[1], len(class_names))
    save_prior(settings.out, unet, flags, schedule_config, class_names,
               {"config": to_dict(config), "data": data, "report": report.to_dict()})
    print(f"train-prior: {report.steps} steps in {report.wall_time_s:.1f}s (final loss {report.final_loss:.4f}); "
          f"wrote {settings.out}")
    return 0
