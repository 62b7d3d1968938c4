"""The distillation work list: seeds, composites, class interleaving, batching, resume bookkeeping."""
import os

import pytest

from igds_fast.errors import IGDSInputError
from igds_fast.jobs import (
    batch_jobs,
    batch_samples,
    build_jobs,
    image_file_name,
    is_done,
    pending_jobs,
)
from igds_fast.seeding import image_seed

WOOF = ["n02086240", "n02087394", "n02088364"]


def test_jobs_cover_every_class_and_index_with_their_seeds(rng_seed):
    jobs = build_jobs(WOOF, [4, 0, 7], ipc=3, global_seed=rng_seed, composite=1)
    assert len(jobs) == 9
    # image index first, then class in the given order: every batch spans the classes
    assert [(job.image_index, job.class_key) for job in jobs[:4]] == [
        (0, WOOF[0]), (0, WOOF[1]), (0, WOOF[2]), (1, WOOF[0])]
    for job in jobs:
        assert job.label == [4, 0, 7][WOOF.index(job.class_key)]
        assert job.relative_path == os.path.join(job.class_key, f"{job.image_index:05d}.png")
        (sample,) = job.samples
        assert sample.generated_index == job.image_index
        assert sample.seed == image_seed(rng_seed, job.class_key, job.image_index)
    assert len({job.samples[0].seed for job in jobs}) == 9


def test_composites_take_four_consecutive_generated_indices(rng_seed):
    jobs = build_jobs(WOOF[:2], [0, 1], ipc=2, global_seed=rng_seed, composite=4)
    assert len(jobs) == 4
    second = [job for job in jobs if job.class_key == WOOF[1] and job.image_index == 1][0]
    assert [s.slot for s in second.samples] == [0, 1, 2, 3]
    assert [s.generated_index for s in second.samples] == [4, 5, 6, 7]
    assert [s.seed for s in second.samples] == [image_seed(rng_seed, WOOF[1], g) for g in range(4, 8)]


def test_a_class_keeps_its_seeds_when_the_selection_changes(rng_seed):
    alone = build_jobs([WOOF[2]], [0], ipc=2, global_seed=rng_seed)
    among = build_jobs(WOOF, [0, 1, 2], ipc=2, global_seed=rng_seed)
    seeds_alone = [job.samples[0].seed for job in alone]
    seeds_among = [job.samples[0].seed for job in among if job.class_key == WOOF[2]]
    assert seeds_alone == seeds_among
    other_seed = build_jobs([WOOF[2]], [0], ipc=2, global_seed=rng_seed + 1)
    assert [job.samples[0].seed for job in other_seed] != seeds_alone


def test_batches_hold_whole_images_up_to_the_sample_budget():
    jobs = build_jobs(WOOF, [0, 1, 2], ipc=3, global_seed=0, composite=4)
    batches = list(batch_jobs(jobs, 10))  # 10 samples -> 2 composites of 4 per batch
    assert [len(batch) for batch in batches] == [2, 2, 2, 2, 1]
    assert [job for batch in batches for job in batch] == jobs
    samples = batch_samples(batches[0])
    assert len(samples) == 8
    assert [s.image_index for s in samples] == [0] * 8
    assert [s.class_key for s in samples] == [WOOF[0]] * 4 + [WOOF[1]] * 4
    single = list(batch_jobs(build_jobs(WOOF, [0, 1, 2], ipc=2, global_seed=0), 4))
    assert [len(batch) for batch in single] == [4, 2]


def test_pending_jobs_are_those_without_a_file(tmp_path):
    jobs = build_jobs(WOOF[:2], [0, 1], ipc=2, global_seed=0)
    for key in WOOF[:2]:
        (tmp_path / key).mkdir()
    (tmp_path / WOOF[1] / image_file_name(0)).write_bytes(b"png")
    (tmp_path / WOOF[0] / ".00001.png.abc.tmp").write_bytes(b"partial")  # an interrupted write
    pending = pending_jobs(jobs, tmp_path)
    assert [(job.class_key, job.image_index) for job in pending] == [(WOOF[0], 0), (WOOF[0], 1), (WOOF[1], 1)]
    assert is_done(jobs[1], tmp_path) and not is_done(jobs[0], tmp_path)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_jobs(WOOF, [0, 1, 2], ipc=0, global_seed=0), "IPC must be a positive integer, got 0"),
        (lambda: build_jobs(WOOF, [0, 1, 2], ipc=-2, global_seed=0), "IPC must be a positive integer"),
        (lambda: build_jobs(WOOF, [0, 1, 2], ipc=2.5, global_seed=0), "IPC must be a positive integer"),
        (lambda: build_jobs(WOOF, [0, 1, 2], ipc=1, global_seed=0, composite=2), "composite must be one of"),
        (lambda: build_jobs([], [], ipc=1, global_seed=0), "no classes"),
        (lambda: build_jobs(["a", "a"], [0, 1], ipc=1, global_seed=0), "selected twice"),
        (lambda: build_jobs(["a/b"], [0], ipc=1, global_seed=0), "folder name"),
        (lambda: build_jobs([".."], [0], ipc=1, global_seed=0), "folder name"),
        (lambda: list(batch_jobs(build_jobs(WOOF, [0, 1, 2], 1, 0), 0)), "batch size must be a positive integer"),
        (lambda: list(batch_jobs(build_jobs(WOOF, [0, 1, 2], 1, 0), -3)), "batch size must be a positive integer"),
        (lambda: list(batch_jobs(build_jobs(WOOF, [0, 1, 2], 1, 0, composite=4), 3)), "cannot hold one composite"),
    ],
)
def test_bad_input_is_one_line(call, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
