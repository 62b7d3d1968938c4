"""`igds-fast eval --protocol rded|sre2l` under torchrun (gloo on loopback, CPU) against one process.

Stated tolerance: 2 ranks compute the 1-rank arithmetic up to the order of floating-point sums (the
draws are keyed by seed and epoch, each rank augments its share and its partners, gradients are
summed, BatchNorm statistics span the ranks), so the test accuracy of every seed agrees within
TOLERANCE_POINTS (one test image of 30 here); the SRe2L relabel files are the same bytes. Run with our
convnet3 as student and teacher (in CI) and with torchvision's ShuffleNet (BatchNorm: the statistics
reduced over the ranks; skipped without the torchvision extra)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from igds_fast.cli import main
from soft_data import random_teacher, torchvision_or_skip, write_colour_folder

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
       "IGDS_DATA_WORKERS": "0"}
TOLERANCE_POINTS = 100.0 / 30  # one of the 30 test images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NETWORKS = ("convnet3", pytest.param("torchvision:shufflenet_v2_x0_5", marks=pytest.mark.torchvision))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_torchrun")
    write_colour_folder(root / "distilled", 4, 40, seed=11)
    write_colour_folder(root / "val", 10, 36, seed=12)
    return {"root": root}


def _teacher(data, network):
    path = data["root"] / f"teacher_{network.replace(':', '_')}.pt"
    return str(path) if path.exists() else random_teacher(path, arch=network, seed=3)


def _argv(data, out, protocol, relabel=None, network="convnet3"):
    argv = ["eval", "--train", str(data["root"] / "distilled"), "--val", str(data["root"] / "val"), "--protocol", protocol,
            "--teacher", _teacher(data, network), "--teacher-arch", network, "--network", network, "--image-size", "32", "--epochs", "3", "--seeds", "2",
            "--batch-size", "6", "--device", "cpu", "--quiet", "--ignore-class-check", "--out", str(out)]
    return argv + (["--relabel-dir", str(relabel)] if relabel else [])


def _two_ranks(argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "igds_fast", *argv]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("protocol", ["rded", "sre2l"])
def test_two_ranks_match_one_within_the_stated_tolerance(data, tmp_path, protocol, network):
    if network.startswith("torchvision:"):
        torchvision_or_skip()
    one_relabel = tmp_path / "one_relabel" if protocol == "sre2l" else None
    two_relabel = tmp_path / "two_relabel" if protocol == "sre2l" else None
    assert main(_argv(data, tmp_path / "one.json", protocol, one_relabel, network)) == 0
    _two_ranks(_argv(data, tmp_path / "two.json", protocol, two_relabel, network))
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    differences = [abs(a - b) for a, b in zip(one["accuracies"], two["accuracies"])]
    assert max(differences) <= TOLERANCE_POINTS + 1e-9, (one["accuracies"], two["accuracies"])
    if protocol == "sre2l":  # each epoch made by one rank: the same files
        names = sorted(os.listdir(one_relabel))
        assert sorted(os.listdir(two_relabel)) == names
        for name in names:
            assert (one_relabel / name).read_bytes() == (two_relabel / name).read_bytes(), name


def test_a_bad_input_under_torchrun_is_one_line_from_rank_0(data, tmp_path):
    argv = _argv(data, tmp_path / "x.json", "rded")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "missing.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "igds_fast", *argv]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("igds-fast: error: teacher file") == 1, result.stderr[-2000:]


def _batch_norm_rank(rank: int, world: int, init: str, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from igds_fast.distributed import DistContext
    from igds_fast.evaluate.kd_train import synchronise_batch_norm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
        model = synchronise_batch_norm(model, DistContext(rank=rank, world_size=world, backend="gloo")).train()
        share = x[rank * 10 // world:(rank + 1) * 10 // world]
        loss = model(share).square().sum() / 10.0  # this rank's part of the full batch's mean
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        dist.all_reduce(grads)
        bn = model[1]
        queue.put((rank, None, grads.numpy(), bn.running_mean.numpy(), bn.running_var.numpy()))  # by value
        dist.barrier()  # leave together: a rank tearing down while its peer finishes the all-reduce aborted it (-6)
    finally:
        dist.destroy_process_group()


def test_all_reduce_batch_norm_equals_batch_norm_on_the_whole_batch(tmp_path):
    """AllReduceBatchNorm (gloo / CPU) against nn.BatchNorm2d on the full batch: gradients and running statistics."""
    import torch
    import torch.multiprocessing as mp
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).train()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    (model(x).square().sum() / 10.0).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    context = mp.get_context("spawn")
    queue = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [context.Process(target=_batch_norm_rank, args=(rank, 2, init, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        results = [queue.get(timeout=180) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in processes] == [0, 0]
    for _, _, grads, mean, var in results:
        grads, mean, var = torch.from_numpy(grads), torch.from_numpy(mean), torch.from_numpy(var)
        assert torch.allclose(grads, expected, rtol=1e-5, atol=1e-6), (grads - expected).abs().max()
        assert torch.allclose(mean, model[1].running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(var, model[1].running_var, rtol=1e-5, atol=1e-6)


def test_every_rank_passes_a_barrier_before_leaving_the_process_group(monkeypatch):
    """Rank 0 writes the results after the last collective; a rank that tears the group down alone meanwhile
    can abort gloo (distill/run.py met it; the BatchNorm test above saw a rank end in SIGABRT before its own
    barrier). run_soft passes a barrier between the run and the teardown, on every rank."""
    from types import SimpleNamespace

    from igds_fast.cli import eval_soft
    from igds_fast.distributed import DistContext

    calls = []
    protocol = SimpleNamespace(batch_size=2, image_size=8)
    settings = SimpleNamespace(training=SimpleNamespace(device="cpu", kd_protocol=lambda *args: protocol), image_size=None)
    for rank in (0, 1):
        ctx = DistContext(rank=rank, world_size=2, backend="gloo")
        monkeypatch.setattr(eval_soft, "init_distributed", lambda device, ctx=ctx: ctx)
        monkeypatch.setattr(eval_soft, "_run", lambda *args: calls.append("run") or 0)
        monkeypatch.setattr(eval_soft, "barrier", lambda ctx: calls.append("barrier"))
        monkeypatch.setattr(eval_soft, "shutdown", lambda ctx: calls.append("shutdown"))
        assert eval_soft.run_soft(settings, ["a", "b"], None, None, 1, {}, str) == 0
        assert calls == ["run", "barrier", "shutdown"], (rank, calls)
        calls.clear()
