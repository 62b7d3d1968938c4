"""Step-level progress (issue 15, item 3): fractional items in flight, CUDA-event step reports, no repeats.

The torchrun side (one line for the job) is tests/test_torchrun_progress.py.
"""
from __future__ import annotations

import pytest
import torch

from factories import FakeStream, tiny_adm, tiny_ve, write_tiny_prior_and_ve
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.distributed import DistContext, ProgressRounds
from igds_fast.errors import IGDSInputError
from igds_fast.guidance import GuidanceConfig
from igds_fast.progress import Progress
from igds_fast.sampling import Sampler
from igds_fast.sampling.sampler import _StepWatch

pytestmark = pytest.mark.usefixtures("one_thread")


Stream = FakeStream


def test_partial_items_count_in_the_line_rate_and_eta():
    now = [0.0]
    stream = Stream()
    progress = Progress(10, stream=stream, clock=lambda: now[0], log_interval_s=0.0)
    now[0] = 2.0
    progress.set_partial(0.5)  # half an item in 2 s, before any finished: the rate is known already
    assert progress.describe() == "0.5/10 img (5%) 0.25 img/s ETA 38s"
    progress.set_partial(0)
    progress.update(1)
    assert progress.describe().startswith("1/10 img (10%) 0.50 img/s")
    progress.set_partial(100)  # clamped to what is left
    assert progress.progressed == 10 and progress.bar() == "[" + "#" * 30 + "]"
    assert stream.text.splitlines()[0].startswith("0.5/10 img")


def test_close_does_not_repeat_the_final_line():
    stream = Stream()
    progress = Progress(2, stream=stream, log_interval_s=100.0)
    progress.update(1)
    progress.update(1)  # reaches the total: the final line
    progress.close()
    assert [line.split(" img")[0] for line in stream.text.splitlines()] == ["1/2", "2/2"]
    tty = Stream(tty=True)
    bar = Progress(2, stream=tty, min_interval_s=0.0)
    bar.update(2)
    bar.close()
    assert tty.text.count("2/2 img") == 1 and tty.text.endswith("\n")
    unfinished = Stream()
    partial = Progress(4, stream=unfinished, log_interval_s=100.0)
    partial.update(1)
    partial.update(1)  # throttled: not shown
    partial.close()  # the last state is always reported
    assert [line.split(" img")[0] for line in unfinished.text.splitlines()] == ["1/4", "2/4"]


class FakeEvent:
    """A CUDA event stand-in: completes when the fake device has run `finished[0]` steps."""

    recorded: list = []  # noqa: RUF012 (reset by the test)
    finished = [0]  # noqa: RUF012

    def __init__(self):
        self.index = len(FakeEvent.recorded) + 1

    def record(self, stream=None):
        FakeEvent.recorded.append(self)

    def query(self):  # what _StepWatch may call; it has no synchronize or wait to call
        return self.index <= FakeEvent.finished[0]


def test_step_watch_reports_completed_events_only_and_never_waits(monkeypatch):
    FakeEvent.recorded, FakeEvent.finished = [], [0]
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("the watch synchronised"))
    reports = []
    watch = _StepWatch(lambda done, total: reports.append((done, total)), 5, "cuda:1")
    watch.issued(1)
    watch.issued(2)  # the device has finished nothing yet
    assert reports == []
    FakeEvent.finished[0] = 2
    watch.issued(3)  # two done: one report of the newest
    assert reports == [(2, 5)]
    FakeEvent.finished[0] = 3
    watch.issued(4)
    watch.issued(5)
    watch.finished()  # the batch's host read: everything done
    assert reports == [(2, 5), (3, 5), (5, 5)] and len(FakeEvent.recorded) == 5


@pytest.fixture(scope="module")
def sampler():
    unet, ve = tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)
    return Sampler(unet, DiffusionSchedule(ScheduleConfig(sampling_steps="5")), ve, GuidanceConfig(scale=1.0, beta=0.5),
                   prior_class_map=[3, 17, 250, 999])


def test_sample_reports_every_step_on_cpu(sampler):
    reports = []
    images = sampler.sample([0, 1], [3, 4], on_steps_done=lambda done, total: reports.append((done, total)))
    assert reports == [(k, 5) for k in range(1, 6)]
    torch.testing.assert_close(images, sampler.sample([0, 1], [3, 4]), rtol=0, atol=0)  # no effect on pixels
    with pytest.raises(IGDSInputError, match="on_steps_done must be callable"):
        sampler.sample([0], [1], on_steps_done=3)


def test_progress_rounds_are_a_no_op_in_one_process():
    rounds = ProgressRounds(DistContext(), rounds=2)
    rounds.post(3)
    rounds.post(5)
    rounds.post(7)  # not counted: one process has no rounds to pair
    assert rounds.others() == 0 and rounds.finish(7) == 0


def test_distill_moves_the_line_within_a_batch(tmp_path, monkeypatch):
    from igds_fast.distill import distill, distill_config
    from igds_fast.distill import run as run_module

    write_tiny_prior_and_ve(tmp_path)
    seen = []

    class Recording(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, stream=Stream(), **kwargs)

        def set_partial(self, items):
            super().set_partial(items)
            seen.append(("partial", items))

        def update(self, count=1):
            super().update(count)
            seen.append(("done", self.done))

    monkeypatch.setattr(run_module, "Progress", Recording)
    distill(distill_config(str(tmp_path / "ve.safetensors"), str(tmp_path / "out"), 2,
                           prior=str(tmp_path / "prior.safetensors"), steps=4, batch_size=2, composite=1, device="cpu"))
    # two batches of two images, four steps each: a quarter batch per step, then the writes
    batch = [("partial", 0.5), ("partial", 1.0), ("partial", 1.5), ("partial", 2.0), ("partial", 0)]
    assert seen == batch + [("done", 1), ("done", 2)] + batch + [("done", 3), ("done", 4)]
