"""The training volume of `calibrate-beta` and `eval`, printed before they train (as distill --plan's cost).

Volume = networks x epochs x images (image-passes of training), plus the test passes. FLOPs: the
network's forward on one image counted on the meta device (igds_fast/models/flops.py: matmuls and
convolutions, multiply-add = 2); training an image costs TRAIN_FACTOR forwards (the forward, the
input gradients and the weight gradients of every layer: 1 + 2); testing one forward. The time is a
FLOP-based estimate on the device at hand (igds_fast/throughput.py), labelled as such: small
networks on a GPU reach a small fraction of its peak, so it is a lower bound there.

    eval:            seeds networks, each `epochs` over the distilled set, tested on the validation
                     set once (plus every epochs // best_checkpoints epochs under a protocol that
                     reports the best checkpoint, MinimaxDiffusion's).
    calibrate-beta:  one VE forward over the training set (the KL scores), then per IPC
                     len(betas) x seeds networks of IPC x classes images, each tested once.
    eval rded/sre2l: seeds students per set (distilled, random-real) and label mode (soft, hard), each
                     `epochs` over its set and tested at the protocol's test points; plus the teacher:
                     rded runs it on every image-pass of a soft run (online KD), sre2l once per epoch
                     and image of each set (the relabel, replayed by every seed), and both on the
                     class-order check's validation images.
"""
from __future__ import annotations

import sys

import torch

from .models.flops import forward_flops, resnet_forward_flops
from .throughput import device_name, flop_time, format_flops, format_hours

TRAIN_FACTOR = 3  # forward + input gradients + weight gradients, each about one forward's products


def network_forward_flops(network: str, channels: int, num_classes: int, image_size: int, width: int = 128) -> int:
    """One forward of an evaluation network on one image [channels, image_size, image_size] (meta device)."""
    from .evaluate.networks import build_eval_network

    with torch.device("meta"):
        model = build_eval_network(network, channels, num_classes, image_size, width=width).eval()
        image = torch.randn(1, channels, image_size, image_size)
    return forward_flops(model, image)


def volume_lines(prefix: str, groups: list[tuple[int, int, int]], forward: int, test_passes: int, test_images: int,
                 device, network: str, extra_flops: int = 0, extra_label: str = "") -> list[str]:
    """The lines: groups of (networks, epochs, images per network); test_passes in all over test_images."""
    passes = sum(networks * epochs * images for networks, epochs, images in groups)
    networks = sum(group[0] for group in groups)
    terms = " + ".join(f"{n:,} x {e:,} epochs x {i:,} images" for n, e, i in groups)
    train_flops = passes * TRAIN_FACTOR * forward
    test_flops = test_passes * test_images * forward
    total = train_flops + test_flops + extra_flops
    lines = [f"{prefix} {networks:,} network(s): {terms} = {passes:,} image-passes of training",
             f"{prefix} {network}: {format_flops(forward)} forward per image, x{TRAIN_FACTOR} to train: "
             f"{format_flops(train_flops)} training + {format_flops(test_flops)} testing ({test_passes:,} passes over "
             f"{test_images:,} images)" + (f" + {format_flops(extra_flops)} {extra_label}" if extra_flops else "")
             + f" = {format_flops(total)}"]
    seconds, label = flop_time(total, device, "fp32")
    where = device_name(device)
    lines.append(f"{prefix} time on {where}: " + (f"not estimated ({label})" if seconds is None
                                                 else f"~{format_hours(seconds)} ({label}; small networks reach less)"))
    return lines


def eval_volume_lines(recipe, training: dict, class_counts: list[int], channels: int, image_size: int,
                      val_images: int, device) -> list[str]:
    """`eval`'s volume. recipe: the EvalSettings; training: its keywords() (the protocol resolved);
    class_counts: distilled images per class; val_images: the validation images tested."""
    protocol = training["protocol"]
    ipc = max(class_counts)
    epochs = training.get("epochs") or protocol.epochs(ipc, len(class_counts))
    best = getattr(protocol, "best_checkpoints", 0) or 0
    tests = 1 + (epochs // max(1, epochs // best) if best else 0)
    forward = network_forward_flops(recipe.network, channels, len(class_counts), image_size, recipe.width)
    return volume_lines("eval: plan:", [(recipe.seeds, epochs, sum(class_counts))], forward, recipe.seeds * tests,
                        val_images, device, recipe.network)


def teacher_forward_flops(arch: str, outputs: int, image_size: int) -> int | None:
    """One forward of the soft-label protocols' teacher on one RGB image (meta device); None when the
    architecture cannot be built on the meta device."""
    from .evaluate.teachers import teacher_builder

    try:
        with torch.device("meta"):
            model = teacher_builder(arch, image_size)(outputs).eval()
            image = torch.randn(1, 3, image_size, image_size)
        return forward_flops(model, image)
    except Exception:  # a torchvision model that does not build on meta: the line says it was not counted
        return None


def soft_eval_volume_lines(protocol, recipe, set_sizes: list[int], num_classes: int, teacher_outputs: int,
                           teacher_arch: str, check_images: int, val_images: int, device) -> list[str]:
    """`eval --protocol rded|sre2l`'s volume. protocol: the KDProtocol (epochs, image_size, test points);
    recipe: the EvalSettings; set_sizes: images of each set trained on (distilled, then random-real)."""
    modes = 2 if recipe.also_hard_labels else 1
    epochs = protocol.epochs
    groups = [(recipe.seeds, epochs, images) for images in set_sizes for _ in range(modes)]
    student = network_forward_flops(recipe.network, 3, num_classes, protocol.image_size, recipe.width)
    # kd_train's test points before the last epoch, then the final test
    tests = sum(1 for epoch in range(epochs - 1) if protocol.tests_after(epoch)) + 1
    networks = sum(group[0] for group in groups)
    teacher = teacher_forward_flops(teacher_arch, teacher_outputs, protocol.image_size)
    if protocol.name == "rded":
        teacher_passes = recipe.seeds * epochs * sum(set_sizes)
        what = f"teacher {teacher_arch}: {teacher_passes:,} online labellings + {check_images:,} check"
    else:
        teacher_passes = epochs * sum(set_sizes)
        what = f"teacher {teacher_arch}: {teacher_passes:,} relabel passes + {check_images:,} check"
    teacher_passes += check_images
    if teacher is None:
        lines = volume_lines("eval: plan:", groups, student, networks * tests, val_images, device, recipe.network)
        return lines[:2] + [f"eval: plan: {what} forwards (not counted: {teacher_arch} does not build on the meta "
                            "device)"] + lines[2:]
    return volume_lines("eval: plan:", groups, student, networks * tests, val_images, device, recipe.network,
                        extra_flops=teacher_passes * teacher, extra_label=f"{what} forwards")


def calibrate_volume_lines(calibration, num_classes: int, channels: int, image_size: int, train_images: int,
                           val_images: int, ve_forward: int, device) -> list[str]:
    """`calibrate-beta`'s volume. calibration: the CalibrationSettings; ve_forward: one VE forward's FLOPs
    (the scoring pass runs it over every training image)."""
    from .evaluate.protocol import igds_epochs

    groups = [(len(calibration.betas) * calibration.seeds, calibration.epochs or igds_epochs(ipc), ipc * num_classes)
              for ipc in calibration.ipcs]
    forward = network_forward_flops(calibration.network, channels, num_classes, image_size, calibration.width)
    networks = sum(group[0] for group in groups)
    return volume_lines("calibrate-beta: plan:", groups, forward, networks, val_images, device, calibration.network,
                        extra_flops=train_images * ve_forward, extra_label=f"scoring ({train_images:,} VE forwards)")


def announce_eval(settings, training: dict, train_paths: list[list[str]], class_names: list[str], image_size: int) -> None:
    """Print `eval`'s volume on stderr before it trains (settings: the EvalRun; training: its keywords;
    train_paths: the distilled folder's files per class)."""
    from .data import scan_image_folder
    from .devices import resolve_device

    _, val_paths = scan_image_folder(settings.val, class_names, ignore_unlisted=True)
    lines = eval_volume_lines(settings.training, training, [len(paths) for paths in train_paths], settings.channels,
                              image_size, sum(len(paths) for paths in val_paths), resolve_device(settings.training.device))
    print("\n".join(lines), file=sys.stderr, flush=True)


def announce_calibration(calibration, ve, train_images: int, val_images: int, image_size: int, log) -> None:
    """Log `calibrate-beta`'s volume before it trains (calibration: the CalibrationSettings)."""
    from .devices import resolve_device

    channels = ve.encoder.in_channels
    ve_forward = resnet_forward_flops(ve.arch, channels, ve.resolution, (channels, image_size, image_size))
    for line in calibrate_volume_lines(calibration, ve.num_classes, channels, image_size, train_images, val_images,
                                       ve_forward, resolve_device(calibration.device)):
        log(line)


__all__ = ["announce_calibration", "announce_eval", "TRAIN_FACTOR", "calibrate_volume_lines", "eval_volume_lines",
           "network_forward_flops", "soft_eval_volume_lines", "teacher_forward_flops", "volume_lines"]
