"""`igds-fast eval --protocol rded|sre2l`: the soft-label path of the eval command (also under torchrun).

Order (every refusal before training): the teacher file and its architecture / class count, the
sets (the distilled one at its stored side, streamed when it does not fit IGDS_IN_MEMORY_MB; the
real validation split at the protocol's Resize + CenterCrop), the class-order check, then per set
(distilled, and the random real baseline) the soft-label run (sre2l: its relabel stage first) and,
with --also-hard-labels, the hard-label run. Rank 0 prints and writes the results.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from igds_fast.data import FolderImages
from igds_fast.distributed import QuietRankError, barrier, init_distributed, rank_device, shutdown
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.kd_run import check_teacher, evaluate_soft, load_teacher, prepare_relabel, relabel_spec
from igds_fast.evaluate.sets import BASELINE_SEED, flatten
from igds_fast.evaluate.settings import EvalRun
from igds_fast.imageio import write_json_atomic
from igds_fast.settings import to_dict
from igds_fast.threads import cpu_threads, torch_threads
from igds_fast.training_cost import soft_eval_volume_lines


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_soft(settings: EvalRun, class_names, train_paths, real_paths, ipc: int, cut: dict,
             format_table: Callable[[list[dict]], str]) -> int:
    """The soft-label run; ``format_table`` prints the results as the eval command prints every protocol's."""
    ctx = init_distributed(settings.training.device)
    try:
        device = torch.device(rank_device(ctx, settings.training.device))
        protocol = settings.training.kd_protocol(ipc, len(class_names), settings.image_size)
        # One thread for small work on a shared CPU (igds_fast.threads); a step's pixels decide.
        with torch_threads(cpu_threads(device, None, protocol.batch_size * 3 * protocol.image_size ** 2)):
            code = _run(settings, class_names, train_paths, real_paths, ipc, cut, ctx, device, protocol, format_table)
        barrier(ctx)  # leave the process group together (rank 0 writes the results after the last collective): a lone
        return code  # teardown can abort gloo, as distill/run.py found
    except IGDSInputError as exc:
        if ctx.rank != 0 and not getattr(exc, "quiet", False):
            raise QuietRankError(str(exc)) from None
        raise
    finally:
        shutdown(ctx)


def _run(settings: EvalRun, class_names, train_paths, real_paths, ipc: int, cut: dict, ctx, device, protocol,
         format_table) -> int:
    recipe = settings.training
    build_eval_network(recipe.network, 3, len(class_names), protocol.image_size, recipe.width)  # a bad student fails first
    source_side = settings.stored_size(class_names[0])
    streamed_note = {}

    def load(paths_per_class, root: str) -> FolderImages:
        paths, labels = flatten(paths_per_class)
        images = FolderImages.from_paths(paths, labels, class_names, source_side, on_corrupt=settings.on_corrupt,
                                         root=root, progress=settings.progress and ctx.is_main)
        streamed_note[root] = not images.in_memory
        return images

    val = FolderImages(settings.val, protocol.image_size, on_corrupt=settings.on_corrupt, class_names=class_names,
                       ignore_unlisted=True, progress=settings.progress and ctx.is_main, resize=protocol.test_resize)
    teacher = load_teacher(recipe.teacher, recipe.teacher_arch, class_names, protocol.image_size, device)
    sets = [("distilled", load(train_paths, settings.train))]
    if real_paths is not None:
        sets.append(("random-real", load(real_paths, settings.real)))
    relabels = {}
    if protocol.name == "sre2l":  # the storage and the disk before the teacher runs at all
        for set_name, source in sets:
            folder = settings.relabel_dir if set_name == "distilled" else os.path.join(settings.relabel_dir, "random-real")
            relabels[set_name] = (folder, relabel_spec(protocol, teacher, source, recipe.soft_label_topk))
            prepare_relabel(*relabels[set_name], ctx, _log)
    check = check_teacher(teacher, val, device, ctx, recipe.ignore_class_check, _log)
    if ctx.is_main and settings.progress:
        _log(f"teacher {teacher.info['arch']} ({teacher.info['outputs']} outputs; {teacher.info['mapping']}): "
             f"top-1 {check['accuracy_percent']:.1f}% on {check['images']} real validation images "
             f"(chance {check['chance_percent']:.1f}%)")
    if ctx.is_main:  # the volume after every input is read and checked, before the training (issue 28)
        lines = soft_eval_volume_lines(protocol, recipe, [len(source) for _, source in sets], len(class_names),
                                       teacher.info["outputs"], teacher.info["arch"], check["images"], len(val), device)
        print("\n".join(lines), file=sys.stderr, flush=True)
    runs = []
    for set_name, source in sets:
        relabel = relabels.get(set_name)
        modes = ["soft"] + (["hard"] if recipe.also_hard_labels else [])
        for mode in modes:
            result = evaluate_soft(protocol=protocol, network=recipe.network, set_name=set_name, source=source, ipc=ipc,
                                   val=val, teacher=teacher if mode == "soft" else None, mode=mode, seeds=recipe.seeds,
                                   device=device, ctx=ctx, relabel=relabel, progress=settings.progress, log=_log,
                                   width=recipe.width)
            result["streamed"] = streamed_note.get(settings.train if set_name == "distilled" else settings.real, False)
            runs.append(result)
    if not ctx.is_main:
        return 0
    headline = dict(runs[0])
    headline.update({"classes": class_names, "train_dir": os.path.abspath(settings.train),
                     "val_dir": os.path.abspath(settings.val), "train_subset": cut, "teacher": teacher.info,
                     "settings": to_dict(settings), "runs": runs[1:]})
    by_key = {(r["set"], r["labels"]): r for r in runs}
    lines = []
    if ("distilled", "hard") in by_key:
        share = by_key[("distilled", "soft")]["mean"] - by_key[("distilled", "hard")]["mean"]
        headline["teacher_share"] = share
        lines.append(f"soft - hard labels (distilled): {share:+.2f} points: what the teacher carries")
    if ("random-real", "soft") in by_key:
        gain = by_key[("distilled", "soft")]["mean"] - by_key[("random-real", "soft")]["mean"]
        headline["gain_over_random_real"] = gain
        headline["baseline"] = {"real_dir": os.path.abspath(settings.real),
                                "selection": f"{ipc} files per class drawn with seed {BASELINE_SEED}",
                                "files": [os.path.relpath(p, settings.real) for p in flatten(real_paths)[0]]}
        lines.append(f"distilled - random real ({protocol.name}, soft labels): {gain:+.2f} points (last-epoch means)")
    if settings.out is not None:
        write_json_atomic(settings.out, headline)
    print(format_table(runs))
    for line in lines:
        print(line)
    if settings.out is not None:
        print(f"results written to {settings.out}")
    return 0
