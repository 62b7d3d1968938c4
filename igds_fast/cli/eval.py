"""`igds-fast eval`: train networks on a distilled image folder, test them on a real validation folder.

Its flags are generated from `EvalRun` and the `EvalSettings` it holds (igds_fast/evaluate/settings.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from igds_fast.cli import PROG
from igds_fast.data import FolderImages, load_image_folder, scan_image_folder
from igds_fast.devices import resolve_device
from igds_fast.limits import check_fits
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.settings import EvalRun
from igds_fast.evaluate.train import evaluate_distilled
from igds_fast.imageio import check_output_file, write_json_atomic
from igds_fast.overlap import check_apart
from igds_fast.progress import Progress
from igds_fast.settings import add_arguments, from_args, to_dict
from igds_fast.training_cost import announce_eval

SETTINGS = EvalRun


def add_parser(subparsers) -> None:
    """Declare `igds-fast eval` (handler: `run`)."""
    parser = subparsers.add_parser(
        "eval",
        allow_abbrev=False,
        help="train networks on a distilled image folder, test on a real validation folder",
        description=(
            "Train NETWORK on the distilled ImageFolder, test on the real validation ImageFolder of "
            "the same classes; report mean +- std over seeds of the last epoch's accuracy. "
            "--protocol igds (default): IGDS Appendix F, Adam lr 0.01, random-resized-crop, flip and "
            "CutMix for the IPC's epochs. --protocol minimax: MinimaxDiffusion's train.py (SGD "
            "momentum 0.9, weight decay, step schedule, batch 64, colour jitter, PCA lighting, "
            "ImageNet mean/std; RGB only), which also reports the best accuracy over checkpoints. "
            "--lr, --schedule, --weight-decay, --batch-size, --epochs, --no-flip and --cutmix-prob "
            "override the protocol's value and are recorded as overrides in the results. "
            "Class order (labels) is the distilled folder's; every class must exist in both."
        ),
    )
    add_arguments(parser, EvalRun)
    parser.set_defaults(handler=run)


def describe_protocol(result: dict) -> str:
    """One line: the protocol's name, its effective settings and which of them were overridden."""
    protocol = result.get("protocol") or {}
    settings = f"{result.get('optimizer', 'adam')} lr {result['lr']:g}"
    if result.get("momentum"):
        settings += f" momentum {result['momentum']:g}"
    settings += f", weight decay {result['weight_decay']:g}, {result['schedule']} schedule, batch {result['batch_size']}"
    if result.get("normalize"):
        settings += ", mean/std normalised"
    line = f"protocol: {protocol.get('name', 'igds')} ({settings})"
    overrides = result.get("overrides") or {}
    if overrides:
        line += f"; overridden: {', '.join(sorted(overrides))}"
    return line


def format_results_table(results: Sequence[dict]) -> str:
    """A plain-text table: network, IPC, classes, epochs, seeds, accuracy mean +- std (last epoch).

    Headed by each distinct protocol line; a "best" column (best over checkpoints) is added
    when a result has one (the minimax protocol)."""
    with_best = any("best_mean" in r for r in results)
    header = ("network", "IPC", "classes", "epochs", "seeds", "last-epoch accuracy (%)")
    if with_best:
        header += ("best-checkpoint accuracy (%)",)
    rows = []
    for r in results:
        row = (
            str(r["network"]), str(r["ipc"]), str(r["num_classes"]), str(r["epochs"]),
            str(len(r["seeds"])), f"{r['mean']:.2f} \u00b1 {r['std']:.2f}",
        )
        if with_best:
            row += (f"{r['best_mean']:.2f} \u00b1 {r['best_std']:.2f}" if "best_mean" in r else "-",)
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    protocol_lines = list(dict.fromkeys(describe_protocol(r) for r in results if "lr" in r))
    return "\n".join([*protocol_lines, *lines])


def run(args: argparse.Namespace) -> int:
    """`igds-fast eval`: build the settings tree, check both folders, train and test, print (and write) the results."""
    settings = from_args(EvalRun, args)
    recipe = settings.training
    # The results file outside both folders it reads (overlap.py).
    check_apart([("--out", settings.out)], [("--train", settings.train), ("--val", settings.val)])
    if settings.out is not None:
        check_output_file(settings.out)  # before the training, not after it

    # Check both trees (structure, class correspondence) before decoding a single image. Extra
    # validation classes (a full ImageNet val tree for a 10-class subset) are not evaluated.
    class_names, train_paths = scan_image_folder(settings.train)
    scan_image_folder(settings.val, class_names, ignore_unlisted=True)
    image_size = settings.load_size(class_names[0])
    # The distilled set is held on the device as float32 [N, C, S, S] for the whole training: it must fit.
    count = sum(len(paths) for paths in train_paths)
    check_fits(4 * count * settings.channels * image_size ** 2, resolve_device(recipe.device),
               f"holding the {count} distilled images of {settings.channels}x{image_size}x{image_size}")
    build_eval_network(recipe.network, settings.channels, len(class_names), image_size, width=recipe.width)
    # The preset for this problem (refuses minimax on grey images) and the flags that override it.
    training = recipe.keywords(len(class_names), settings.channels)

    train_x, train_y, _, train_report = load_image_folder(
        settings.train, image_size, channels=settings.channels, on_corrupt=settings.on_corrupt, class_names=class_names
    )
    # The real validation set: one decoding pass (corrupt files) now, then held when small or
    # streamed batch by batch for each seed's accuracy (IGDS_IN_MEMORY_MB).
    val = FolderImages(settings.val, image_size, channels=settings.channels, on_corrupt=settings.on_corrupt,
                       class_names=class_names, ignore_unlisted=True, progress=settings.progress)
    val_report = val.report
    announce_eval(settings, training, train_paths, class_names, image_size)  # after the checks (issue 28)

    progress = (lambda message: print(message, file=sys.stderr, flush=True)) if settings.progress else None
    bars: dict = {}

    def on_epoch(seed: int, done: int, epochs: int) -> None:
        if seed not in bars:
            bars[seed] = Progress(total=epochs, unit="epoch", label=f"eval {recipe.network} seed {seed}")
        bars[seed].update(1)
        if done == epochs:
            bars[seed].close()

    results = evaluate_distilled(train_x, train_y, val, None, num_classes=len(class_names), progress=progress,
                                 on_epoch=on_epoch if settings.progress else None, **training)
    results["classes"] = class_names
    results["train_dir"] = os.path.abspath(settings.train)
    results["val_dir"] = os.path.abspath(settings.val)
    results["val_streamed"] = not val.in_memory
    results["train_load"] = {k: v for k, v in train_report.to_dict().items() if k != "skipped_paths"}
    results["val_load"] = {k: v for k, v in val_report.to_dict().items() if k != "skipped_paths"}
    results["settings"] = to_dict(settings)
    for name, report in (("train", train_report), ("val", val_report)):
        if report.num_skipped_corrupt:
            print(f"{PROG}: warning: skipped {report.num_skipped_corrupt} unreadable {name} image(s)", file=sys.stderr)
    if settings.out is not None:
        write_json_atomic(settings.out, results)
    print(format_results_table([results]))
    if settings.out is not None:
        print(f"results written to {settings.out}")
    return 0
