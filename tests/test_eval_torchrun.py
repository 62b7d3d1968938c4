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


NETWORKS = ("convnet3", "torchvision:shufflenet_v2_x0_5")


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
