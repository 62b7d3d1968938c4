"""`igds-fast eval`: train networks on a distilled image folder, test them on a real validation folder."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from igds_fast.cli import PROG
from igds_fast.errors import IGDSInputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
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
    parser.add_argument("--train", required=True, metavar="DISTILLED_DIR", help="distilled set: DIR/<class>/<images>")
    parser.add_argument("--val", required=True, metavar="REAL_VAL_DIR", help="real validation set: DIR/<class>/<images>")
    parser.add_argument("--network", default="convnet6",
                        help="convnet3..convnet6, resnet_ap10, resnet18_in (default: convnet6)")
    parser.add_argument("--protocol", choices=("igds", "minimax"), default="igds",
                        help="evaluation recipe: igds (the paper's Appendix F) or minimax (MinimaxDiffusion's "
                             "train.py; RGB only) (default: igds)")
    parser.add_argument("--seeds", type=int, default=3, help="networks trained, seeds 0..N-1 (default: 3)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: the protocol's by IPC (igds: 1/10 -> 2000, 20/50 -> 1500, 100 -> 1000; "
                             "minimax: 1 -> 3000, 10 -> 2000, 50 -> 1500, 100/200 -> 1000, 500 -> 500, more -> 300, "
                             "two thirds of that for 100 classes)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side both sets are resized/cropped to (default: the first distilled image's shorter side)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default: 3)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the protocol's: 0.01; minimax above 100 classes 0.1)")
    parser.add_argument("--schedule", choices=("constant", "step", "cosine"), default=None,
                        help="learning-rate schedule (default: the protocol's: igds constant, minimax step "
                             "= x0.2 at 2/3 and 5/6 of the epochs)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay (default: the protocol's: igds 0, minimax 5e-4, above 100 classes 1e-4)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the protocol's (igds: full set up to 256 images, else 64; minimax: 64, "
                             "128 above 100 classes)")
    parser.add_argument("--width", type=int, default=128, help="ConvNet channels (default: 128, the protocol)")
    parser.add_argument("--no-flip", action="store_true", help="disable horizontal flips (e.g. digits, text)")
    parser.add_argument("--cutmix-prob", type=float, default=None,
                        help="probability a batch is CutMixed (default: the protocol's, 1.0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip",
                        help="unreadable images: skip and count them, or stop (default: skip)")
    parser.add_argument("--out", default=None, metavar="RESULTS_JSON", help="write the results here (atomically)")
    parser.add_argument("--quiet", action="store_true", help="no per-seed progress on stderr")
    parser.set_defaults(handler=run)


def _first_image_side(root: str, class_name: str) -> int:
    """Shorter side of the first image of a class (header only, nothing decoded)."""
    from PIL import Image

    from igds_fast.data import is_image_file

    folder = os.path.join(root, class_name)
    first = sorted(name for name in os.listdir(folder) if is_image_file(name))[0]
    path = os.path.join(folder, first)
    try:
        with Image.open(path) as image:
            return min(image.size)
    except OSError as exc:
        raise IGDSInputError(f"cannot read image size of {path!r}: {exc}")


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
    from igds_fast.data import FolderImages, load_image_folder, scan_image_folder
    from dataclasses import replace

    from igds_fast.evaluate.networks import build_eval_network
    from igds_fast.evaluate.protocol import protocol_for
    from igds_fast.evaluate.train import evaluate_distilled
    from igds_fast.imageio import write_json_atomic
    from igds_fast.progress import Progress

    if args.seeds < 1:
        raise IGDSInputError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        raise IGDSInputError(f"--epochs must be >= 1, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise IGDSInputError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay is not None and not args.weight_decay >= 0:
        raise IGDSInputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.batch_size is not None and args.batch_size < 1:
        raise IGDSInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cutmix_prob is not None and not 0.0 <= args.cutmix_prob <= 1.0:
        raise IGDSInputError(f"--cutmix-prob must be in [0, 1], got {args.cutmix_prob}")
    if args.out is not None:
        out_folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_folder):
            raise IGDSInputError(f"output folder {out_folder!r} does not exist")

    # Check both trees (structure, class correspondence) before decoding a single image. Extra
    # validation classes (a full ImageNet val tree for a 10-class subset) are not evaluated.
    class_names, _ = scan_image_folder(args.train)
    scan_image_folder(args.val, class_names, ignore_unlisted=True)
    image_size = args.image_size if args.image_size is not None else _first_image_side(args.train, class_names[0])
    build_eval_network(args.network, args.channels, len(class_names), image_size, width=args.width)
    # The preset for this problem (refuses minimax on grey images) and the flags that override it.
    protocol = protocol_for(args.protocol, len(class_names), args.channels)
    augment = None  # the protocol's, unless a flag changes part of it
    if args.no_flip or args.cutmix_prob is not None:
        changes = {"horizontal_flip": False} if args.no_flip else {}
        if args.cutmix_prob is not None:
            changes["cutmix_prob"] = args.cutmix_prob
        augment = replace(protocol.augment, **changes)

    train_x, train_y, _, train_report = load_image_folder(
        args.train, image_size, channels=args.channels, on_corrupt=args.on_corrupt, class_names=class_names
    )
    # The real validation set: one decoding pass (corrupt files) now, then held when small or
    # streamed batch by batch for each seed's accuracy (IGDS_IN_MEMORY_MB).
    val = FolderImages(args.val, image_size, channels=args.channels, on_corrupt=args.on_corrupt,
                       class_names=class_names, ignore_unlisted=True, progress=not args.quiet)
    val_report = val.report

    progress = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    bars: dict = {}

    def on_epoch(seed: int, done: int, epochs: int) -> None:
        if seed not in bars:
            bars[seed] = Progress(total=epochs, unit="epoch", label=f"eval {args.network} seed {seed}")
        bars[seed].update(1)
        if done == epochs:
            bars[seed].close()

    results = evaluate_distilled(
        train_x, train_y, val, None, network=args.network, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seeds=args.seeds, device=args.device, schedule=args.schedule,
        augment=augment, weight_decay=args.weight_decay, num_classes=len(class_names), width=args.width,
        progress=progress, on_epoch=None if args.quiet else on_epoch, protocol=protocol,
    )
    results["classes"] = class_names
    results["train_dir"] = os.path.abspath(args.train)
    results["val_dir"] = os.path.abspath(args.val)
    results["val_streamed"] = not val.in_memory
    results["train_load"] = {k: v for k, v in train_report.to_dict().items() if k != "skipped_paths"}
    results["val_load"] = {k: v for k, v in val_report.to_dict().items() if k != "skipped_paths"}
    for name, report in (("train", train_report), ("val", val_report)):
        if report.num_skipped_corrupt:
            print(f"{PROG}: warning: skipped {report.num_skipped_corrupt} unreadable {name} image(s)", file=sys.stderr)
    if args.out is not None:
        write_json_atomic(args.out, results)
    print(format_results_table([results]))
    if args.out is not None:
        print(f"results written to {args.out}")
    return 0
