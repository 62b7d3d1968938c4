"""`igds-fast eval`: train networks on a distilled image folder, test them on a real validation folder.

Its flags are generated from `EvalRun` and the `EvalSettings` it holds (igds_fast/evaluate/settings.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from igds_fast.cli import PROG
from igds_fast.data import FolderImages, scan_image_folder
from igds_fast.devices import resolve_device
from igds_fast.distributed import QuietRankError, launched_by_torchrun
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.sets import BASELINE_SEED, first_ipc_files, flatten, random_real_files
from igds_fast.evaluate.settings import EvalRun
from igds_fast.evaluate.train import evaluate_distilled
from igds_fast.limits import check_fits
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
            "--protocol rded / sre2l (soft labels, --teacher CKPT): RDED's online KD and SRe2L's FKD "
            "relabel (--relabel-dir), as their public code runs them; the teacher's class order is "
            "checked on real validation images before training; under torchrun they train data-parallel. "
            "--baseline random-real --real DIR adds a random real subset of the same IPC; "
            "--also-hard-labels the same set with hard labels. "
            "Class order (labels) is the distilled folder's; every class must exist in both."
        ),
    )
    add_arguments(parser, EvalRun)
    parser.set_defaults(handler=run)


def describe_protocol(result: dict) -> str:
    """One line: the protocol's name, its effective settings and which of them were overridden."""
    protocol = result.get("protocol") or {}
    if "labels" in result:  # rded / sre2l
        return (f"protocol: {protocol['name']} (AdamW lr {protocol['lr']:g} [{protocol['lr_source']}], weight decay "
                f"{protocol['weight_decay']:g} on weights, {protocol['schedule'].replace('_', ' ')} per epoch, batch "
                f"{protocol['batch_size']} in {protocol['accumulation_steps']} step(s), T {protocol['temperature']:g}, "
                f"CutMix, crop scale {protocol['crop_scale'][0]:g}-{protocol['crop_scale'][1]:g}, patch factor "
                f"{protocol['patch_factor']}, {protocol['image_size']} px, test resize {protocol['test_resize']})")
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
    with_set = any("set" in r for r in results)
    soft = any("labels" in r for r in results)
    header = (("set",) if with_set else ()) + (("labels",) if soft else ()) + (
        "network", "IPC", "classes", "epochs", "seeds", "last-epoch accuracy (%)")
    if with_best:
        header += ("the peer's figure: best over its test points (%)" if soft else "best-checkpoint accuracy (%)",)
    rows = []
    for r in results:
        row = (((str(r.get("set", "distilled")),) if with_set else ()) + ((str(r.get("labels", "-")),) if soft else ())
               + (str(r["network"]), str(r["ipc"]), str(r["num_classes"]), str(r["epochs"]),
                  str(len(r["seeds"])), f"{r['mean']:.2f} \u00b1 {r['std']:.2f}"))
        if with_best:
            row += (f"{r['best_mean']:.2f} \u00b1 {r['best_std']:.2f}" if "best_mean" in r else "-",)
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    protocol_lines = list(dict.fromkeys(describe_protocol(r) for r in results if "lr" in r or "labels" in r))
    return "\n".join([*protocol_lines, *lines])


def _load_hard_set(settings: EvalRun, paths_per_class, class_names, image_size: int, root: str):
    """(images uint8 [N, C, S, S], labels, load report) of the given files, held in memory (evaluate_distilled
    converts each batch to [-1, 1])."""
    paths, labels = flatten(paths_per_class)
    images = FolderImages.from_paths(paths, labels, class_names, image_size, channels=settings.channels,
                                     on_corrupt=settings.on_corrupt, root=root, in_memory=True)
    return images.as_uint8_tensor(), images.labels, images.report


def run(args: argparse.Namespace) -> int:
    """`igds-fast eval`: build the settings tree, check every input, train and test, print (and write) the results."""
    settings = from_args(EvalRun, args)
    recipe = settings.training
    # The outputs apart from every folder and file the run reads (overlap.py).
    check_apart([("--out", settings.out), ("--relabel-dir", settings.relabel_dir)],
                [("--train", settings.train), ("--val", settings.val), ("--real", settings.real),
                 ("--teacher", recipe.teacher)])
    if settings.out is not None:
        check_output_file(settings.out)  # before the training, not after it

    # Check the trees (structure, class correspondence) before decoding a single image. Extra
    # validation classes (a full ImageNet val tree for a 10-class subset) are not evaluated.
    class_names, train_paths = scan_image_folder(settings.train)
    scan_image_folder(settings.val, class_names, ignore_unlisted=True)
    train_paths, cut = first_ipc_files(train_paths, class_names, settings.ipc)
    ipc = max(len(paths) for paths in train_paths)
    real_paths = None
    if settings.baseline is not None:
        real_paths = random_real_files(settings.real, class_names, ipc)
    if recipe.soft:
        from igds_fast.cli.eval_soft import run_soft  # noqa: PLC0415 - the soft-label path's own module

        return run_soft(settings, class_names, train_paths, real_paths, ipc, cut, format_results_table)
    if launched_by_torchrun():
        message = f"--protocol {recipe.protocol} runs in one process; torchrun shards --protocol rded / sre2l"
        raise IGDSInputError(message) if os.environ.get("RANK", "0") == "0" else QuietRankError(message)

    image_size = settings.load_size(class_names[0])
    # The distilled set is held on the device as uint8 [N, C, S, S] for the whole training: it must fit.
    count = sum(len(paths) for paths in train_paths)
    check_fits(count * settings.channels * image_size ** 2, resolve_device(recipe.device),
               f"holding the {count} distilled images of {settings.channels}x{image_size}x{image_size}")
    build_eval_network(recipe.network, settings.channels, len(class_names), image_size, width=recipe.width)
    # The preset for this problem (refuses minimax on grey images) and the flags that override it.
    training = recipe.keywords(len(class_names), settings.channels)

    train_x, train_y, train_report = _load_hard_set(settings, train_paths, class_names, image_size, settings.train)
    # The real validation set: one decoding pass (corrupt files) now, then held when small or
    # streamed batch by batch for each seed's accuracy (IGDS_IN_MEMORY_MB).
    val = FolderImages(settings.val, image_size, channels=settings.channels, on_corrupt=settings.on_corrupt,
                       class_names=class_names, ignore_unlisted=True, progress=settings.progress)
    val_report = val.report
    announce_eval(settings, training, train_paths, class_names, image_size)  # after the checks (issue 28)

    progress = (lambda message: print(message, file=sys.stderr, flush=True)) if settings.progress else None

    def epoch_hook(set_name: str):
        bars: dict = {}

        def on_epoch(seed: int, done: int, epochs: int) -> None:
            if seed not in bars:
                named = "" if set_name == "distilled" else f" {set_name}"  # the distilled set's label as before
                bars[seed] = Progress(total=epochs, unit="epoch", label=f"eval {recipe.network}{named} seed {seed}",
                                      show_elapsed=True)
            bars[seed].update(1)
            if done == epochs:
                bars[seed].close()
        return on_epoch if settings.progress else None

    results = evaluate_distilled(train_x, train_y, val, None, num_classes=len(class_names), progress=progress,
                                 on_epoch=epoch_hook("distilled"), **training)
    results["classes"] = class_names
    results["train_dir"] = os.path.abspath(settings.train)
    results["val_dir"] = os.path.abspath(settings.val)
    results["val_streamed"] = not val.in_memory
    results["train_load"] = {k: v for k, v in train_report.to_dict().items() if k != "skipped_paths"}
    results["train_subset"] = cut
    results["val_load"] = {k: v for k, v in val_report.to_dict().items() if k != "skipped_paths"}
    results["settings"] = to_dict(settings)
    for name, report in (("train", train_report), ("val", val_report)):
        if report.num_skipped_corrupt:
            print(f"{PROG}: warning: skipped {report.num_skipped_corrupt} unreadable {name} image(s)", file=sys.stderr)
    rows = [results]
    if real_paths is not None:
        real_x, real_y, real_report = _load_hard_set(settings, real_paths, class_names, image_size, settings.real)
        baseline = evaluate_distilled(real_x, real_y, val, None, num_classes=len(class_names), progress=progress,
                                      on_epoch=epoch_hook("random-real"), **training)
        baseline.update({"set": "random-real", "real_dir": os.path.abspath(settings.real),
                         "files": [os.path.relpath(p, settings.real) for p in flatten(real_paths)[0]],
                         "selection": f"{ipc} files per class drawn with seed {BASELINE_SEED}"})
        results["set"] = "distilled"
        results["baseline"] = baseline
        results["gain_over_random_real"] = results["mean"] - baseline["mean"]
        rows.append(baseline)
    if settings.out is not None:
        write_json_atomic(settings.out, results)
    print(format_results_table(rows))
    if real_paths is not None:
        print(f"distilled - random real: {results['gain_over_random_real']:+.2f} points (last-epoch means)")
    if settings.out is not None:
        print(f"results written to {settings.out}")
    return 0
