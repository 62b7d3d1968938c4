"""The ImageNet-1K rehearsal in CI (issue 28, item 2): the README's recipe on a synthetic tree of the 1000
real wnids, every stage its own `igds-fast` process (bench/rehearsal.py: train-ve -> calibrate-beta ->
distill --classes imagenet1k --ipc 1 --composite 4 -> distill --select s3 -> eval), scaled down in
image size, widths, steps and epochs only. Checks what a user relies on (bench/rehearsal.py's
check_outputs) and that each stage printed its cost before it worked."""
import os
import shutil

import pytest

from test_profiling import bench_part


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    bench = bench_part("rehearsal")
    root = str(tmp_path_factory.mktemp("in1k_rehearsal"))
    lines = []
    run = bench.rehearse(root, 1000, bench.CI_STAGES, log=lines.append, timeout=600, **bench.CI_SETTINGS)
    return bench, root, run, lines


def test_every_stage_runs_at_1000_classes(rehearsal):
    bench, root, run, lines = rehearsal
    results = run["results"]
    assert list(results) == list(bench.CI_STAGES), lines
    for stage, result in results.items():
        assert result.get("code") == 0, (stage, result.get("error") or result.get("stderr"))
    assert run["problems"] == []
    assert all(result["peak_mib"] > 0 and result["seconds"] > 0 for result in results.values())


def test_each_stage_states_its_cost_first(rehearsal):
    bench, _, run, _ = rehearsal
    stderr = {stage: result["stderr"] for stage, result in run["results"].items()}
    assert "distill: plan: 1,000 classes x 1 images = 1,000 images (4 samples per image: 2x2 composites) = 4,000 " \
           "samples x 2 steps" in stderr["distill"]
    assert "distill: plan: S3 candidates (G x IPC per class): 1,000 classes x 2 images = 2,000 images" in stderr["distill-s3"]
    assert "calibrate-beta: plan: 2 network(s): 2 x 1 epochs x 1,000 images = 2,000 image-passes" in stderr["calibrate-beta"]
    assert "eval: plan: 1 network(s): 1 x 1 epochs x 1,000 images = 1,000 image-passes" in stderr[bench.CI_EVAL_STAGE]
    assert "teacher convnet3: 1,000 online labellings + 1,000 check forwards" in stderr[bench.CI_EVAL_STAGE]


def test_the_soft_label_number_is_made_with_a_1000_output_teacher(rehearsal):
    """The recipe's last stage is RDED's protocol: soft labels from the teacher over all 1000 outputs, the
    class-order check run on every class and recorded (a random teacher fails it: overridden, said so)."""
    import json

    _, root, _, _ = rehearsal
    with open(os.path.join(root, "work", "eval_rded.json")) as handle:
        result = json.load(handle)
    assert result["protocol"]["name"] == "rded" and result["labels"] == "soft"
    teacher = result["teacher"]
    assert teacher["arch"] == "convnet3" and teacher["outputs"] == 1000 and teacher["class_map"] is None
    assert teacher["class_check"]["overridden"] and not teacher["class_check"]["passed"]
    assert len(result["accuracies"]) == 1 and 0.0 <= result["accuracies"][0] <= 100.0


def test_the_checks_catch_a_broken_folder(rehearsal, tmp_path):
    """check_distilled fails on a missing class, an extra image and a manifest out of the sorted order."""
    bench, root, _, _ = rehearsal
    from igds_fast.classes import class_list

    wnids = class_list("imagenet1k")
    good = os.path.join(root, "work", "in1k_ipc1")
    assert bench.check_distilled(good, wnids, 1) == []
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    shutil.rmtree(broken / wnids[7])
    shutil.copy(broken / wnids[3] / "00000.png", broken / wnids[3] / "00001.png")
    problems = bench.check_distilled(str(broken), wnids, 1)
    assert any("999 class folders" in p for p in problems) and any(wnids[3] in p for p in problems)
    assert bench.check_distilled(good, wnids[1:] + wnids[:1], 1)  # the manifest's order is the list's
