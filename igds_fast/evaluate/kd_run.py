"""An rded / sre2l evaluation from prepared sets: the teacher and its checks, the relabel stage, seeds, results.

``load_teacher`` loads the teacher (:mod:`.teachers`: local file, weights_only) and maps its outputs
to the run's classes (:mod:`.class_check`); ``prepare_relabel`` prints the relabel storage and refuses
a disk that cannot hold it; ``check_teacher`` runs the class-order check on the real validation
images -- all before any training. ``evaluate_soft`` trains ``seeds`` students on one set (the
distilled one, or the random real baseline) with the teacher's soft labels (``rded``: online;
``sre2l``: the relabel stage first, then replay) or, for ``--also-hard-labels``, with the folder
labels under the same recipe, and returns the results record: last-epoch accuracy per seed (the
headline) and the peer's reported figure (best over its test points), labelled.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from igds_fast.artifacts import file_fingerprint
from igds_fast.distributed import DistContext, barrier, main_first, shard
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.class_check import OVERRIDE_FLAG, class_order_check, refuse_unless_passed, teacher_class_map
from igds_fast.evaluate.kd_train import distributed_accuracy, relabel_epochs, summarise, train_student
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.protocol import IMAGENET_MEAN, IMAGENET_STD, NormalizedInput
from igds_fast.evaluate.relabel import RelabelReader, RelabelSpec, pending_epochs, prepare_folder
from igds_fast.evaluate.soft_protocols import KDProtocol
from igds_fast.evaluate.teachers import load_teacher_network
from igds_fast.progress import Progress

DEFAULT_TEACHER_ARCH = "torchvision:resnet18"  # RDED scripts/imagenet-*.sh --arch-name resnet18; SRe2L relabel.sh -a resnet18
RELABEL_SEED = 42  # SRe2L relabel.sh --fkd-seed 42


@dataclass
class Teacher:
    model: nn.Module  # NormalizedInput(teacher): takes [-1, 1] images
    class_map: list[int] | None
    info: dict


def load_teacher(path: str, arch: str | None, class_names: list[str], image_size: int, device) -> Teacher:
    """Load the teacher (built for ``image_size`` px inputs) and map its outputs to the run's classes (one-line
    refusals; see the module docstring). It is fed as the students are: [-1, 1] images normalised to ImageNet's
    mean / std inside (RDED main.py:111-113; SRe2L generate_soft_label.py normalises the same way)."""
    arch = arch or DEFAULT_TEACHER_ARCH
    network, teacher_classes = load_teacher_network(path, arch, image_size)
    class_map, mapping = teacher_class_map(class_names, teacher_classes)
    model = NormalizedInput(network, IMAGENET_MEAN, IMAGENET_STD).to(device).eval()
    info = {"file": path, "arch": arch, "fingerprint": file_fingerprint(path), "outputs": teacher_classes,
            "class_map": class_map, "mapping": mapping, "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    return Teacher(model, class_map, info)


def check_teacher(teacher: Teacher, val, device, ctx: DistContext, override: bool, log: Callable[[str], None]) -> dict:
    """The class-order check on the real validation images (recorded in ``teacher.info``); stops unless passed or overridden."""

    def reduce(counts):
        if ctx.enabled:
            torch.distributed.all_reduce(counts)
        return counts

    check = class_order_check(teacher.model, val, teacher.class_map, device, shard=lambda items: shard(items, ctx),
                              reduce=reduce)
    check["overridden"] = bool(override and not check["passed"])
    teacher.info["class_check"] = check
    warning = refuse_unless_passed(check, override)
    if warning and ctx.is_main:
        log(f"igds-fast: warning: {warning}")
    return check


def prepare_relabel(folder: str, spec: RelabelSpec, ctx: DistContext, log: Callable[[str], None]) -> None:
    """Before any teacher work: the folder against the spec, the storage printed, the disk checked (rank 0 first)."""
    if spec.topk and spec.topk >= spec.num_classes:
        raise IGDSInputError(f"--soft-label-topk {spec.topk} must be below the {spec.num_classes} classes")
    main_first(ctx, lambda: prepare_folder(folder, spec, log if ctx.is_main else None, write=ctx.is_main))
    barrier(ctx)


def relabel_spec(protocol: KDProtocol, teacher: Teacher, source, topk: int) -> RelabelSpec:
    return RelabelSpec(
        teacher={"arch": teacher.info["arch"], "file": teacher.info["fingerprint"]}, images=source.fingerprint(),
        count=len(source), num_classes=len(source.class_names), class_map=teacher.class_map, epochs=protocol.epochs,
        batch_size=protocol.batch_size, seed=RELABEL_SEED, source_side=source.image_size,
        output_side=protocol.image_size, crop_scale=list(protocol.crop_scale), crop_ratio=list(protocol.crop_ratio),
        patch_factor=protocol.patch_factor, flip=protocol.horizontal_flip, cutmix_beta=protocol.cutmix_beta,
        topk=topk, temperature=protocol.temperature if topk else None)


def run_relabel(folder: str, spec: RelabelSpec, source, teacher: Teacher, protocol: KDProtocol, device,
                ctx: DistContext, log: Callable[[str], None], progress: bool) -> dict:
    """The relabel stage (resumable; after :func:`prepare_relabel`): the ranks share the pending epochs."""
    # Every rank reads the same pending list: all read it before any writes (a rank that read it after
    # another had written an epoch would shard a shorter list, and one epoch would be made by nobody).
    barrier(ctx)
    pending = pending_epochs(folder, spec)
    barrier(ctx)
    started = time.perf_counter()
    bar = Progress(total=len(pending), unit="epoch", label="sre2l relabel", enabled=progress and ctx.is_main,
                   show_elapsed=True)
    relabel_epochs(folder, spec, shard(pending, ctx), source, teacher.model, teacher.class_map, protocol, device,
                   on_epoch=lambda _: bar.update(1 if not ctx.enabled else ctx.world_size))
    barrier(ctx)
    bar.close()
    return {"dir": folder, "made_epochs": len(pending), "epochs": spec.epochs, "seconds": round(time.perf_counter() - started, 3),
            "spec": spec.to_dict()}


def evaluate_soft(*, protocol: KDProtocol, network: str, set_name: str, source, ipc: int, val, teacher: Teacher | None,
                  mode: str, seeds: int, device, ctx: DistContext, relabel: tuple[str, RelabelSpec] | None = None,
                  progress: bool = True, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
                  width: int = 128) -> dict:
    """Train ``seeds`` students on ``source`` (FolderImages at its stored side) by ``protocol`` and test on ``val``.

    mode: "soft" (the teacher's labels: online for rded, replayed from ``relabel`` for sre2l) or "hard";
    width: a ConvNet student's channels (--width; 128, RDED's net_width)."""
    num_classes = len(source.class_names)
    size = protocol.image_size
    build_eval_network(network, 3, num_classes, size, width)  # a bad name, size or width fails before any training

    def build_student():
        return NormalizedInput(build_eval_network(network, 3, num_classes, size, width), IMAGENET_MEAN, IMAGENET_STD)

    relabel_record, reader, label_mode = None, None, "hard"
    if mode == "soft" and protocol.name == "sre2l":
        folder, spec = relabel
        relabel_record = run_relabel(folder, spec, source, teacher, protocol, device, ctx, log, progress)
        reader, label_mode = RelabelReader(folder, spec), "replay"
    elif mode == "soft":
        label_mode = "online"
    started = time.perf_counter()
    accuracies, best = [], []
    for seed in range(seeds):
        bar = Progress(total=protocol.epochs, unit="epoch", label=f"eval {protocol.name} {network} {set_name} "
                       f"{mode} seed {seed}", enabled=progress and ctx.is_main, show_elapsed=True)
        points: list[float] = []

        def on_test(epoch, model, points=points):
            points.append(distributed_accuracy(model, val, device, ctx))

        model = train_student(protocol=protocol, build_student=build_student, source=source, labels=source.labels,
                              mode=label_mode, seed=seed, device=device, ctx=ctx,
                              teacher=None if teacher is None else teacher.model,
                              class_map=None if teacher is None else teacher.class_map, reader=reader,
                              on_epoch=lambda done: bar.update(1), on_test=on_test)
        bar.close()
        accuracy = distributed_accuracy(model, val, device, ctx)
        accuracies.append(accuracy)
        if protocol.tests_after(protocol.epochs - 1):
            points.append(accuracy)
        best.append(max(points) if points else None)
        if progress and ctx.is_main:
            line = f"{network} {set_name} ({mode} labels) seed {seed}: {accuracy:.2f}%"
            if points:
                line += f" ({protocol.name}'s figure, best over its test points: {max(points):.2f}%)"
            log(line)
    definitions = {
        "accuracies": "test accuracy after the last epoch, per seed; mean and std (numpy.std) are over these",
        "best_accuracies": (f"{protocol.name}'s reported figure: the best test accuracy over its test points "
                            f"({'RDED main.py:176-192' if protocol.name == 'rded' else 'SRe2L train_FKD.py:183-194'}), "
                            "selected on test data; absent when the run has none (RDED tests only past 80% of "
                            "training, so never in runs of at most 5 epochs)"),
    }
    result = {
        "set": set_name, "labels": mode, "label_source": {"online": "the teacher on every mixed batch",
                                                           "replay": "the recorded teacher soft labels",
                                                           "hard": "the folder labels, CutMix-mixed"}[label_mode],
        "network": network, "ipc": int(ipc), "epochs": protocol.epochs, "num_classes": num_classes,
        "seeds": list(range(seeds)), **summarise(accuracies, best), "unit": "percent", "train_size": len(source),
        "test_size": len(val), "image_size": size, "source_size": source.image_size, "protocol": protocol.to_dict(),
        "world_size": ctx.world_size, "device": str(device), "accuracy_definitions": definitions,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if relabel_record is not None:
        result["relabel"] = relabel_record
    return result


__all__ = ["DEFAULT_TEACHER_ARCH", "OVERRIDE_FLAG", "RELABEL_SEED", "Teacher", "check_teacher", "evaluate_soft",
           "load_teacher", "prepare_relabel", "relabel_spec", "run_relabel"]
