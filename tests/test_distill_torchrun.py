"""distill under torchrun (gloo on loopback): world-size independence, a killed rank, bad input once."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

from test_distill import _distill_args, _parse, file_states, listing, models  # noqa: F401 (fixture)
from igds_fast.cli.distill import run as run_distill

TOTAL = 4 * 4  # _distill_args: 4 classes x IPC 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc, distill_args):
    # Loopback rendezvous only: a standalone rendezvous that needs a network hangs where it is down.
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "igds_fast", "distill", *distill_args,
    ]


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def test_two_ranks_write_the_same_folder_as_one(models, tmp_path):
    one = tmp_path / "one"
    assert run_distill(_parse(_distill_args(models, one))) == 0
    two = tmp_path / "two"
    result = subprocess.run(torchrun_command(2, _distill_args(models, two)), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(two) == listing(one)
    import json

    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["run"]["world_size"] == 2
    ranks = manifest["run"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["images_written"] for r in ranks) == TOTAL and all(r["images_written"] > 0 for r in ranks)


def test_a_rank_killed_midway_then_rerun_completes_the_same_folder(models, tmp_path):
    reference = tmp_path / "reference"
    assert run_distill(_parse(_distill_args(models, reference))) == 0
    out = tmp_path / "killed"
    launcher = subprocess.Popen(torchrun_command(2, _distill_args(models, out)), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(file_states(out)) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))
    workers = children(launcher.pid)
    assert workers, "torchrun finished before a rank could be killed"
    os.kill(random.choice(workers), signal.SIGKILL)
    launcher.wait(timeout=120)  # the agent tears the other rank down: no hang
    assert launcher.returncode != 0
    assert len(file_states(out)) < TOTAL
    result = subprocess.run(torchrun_command(2, _distill_args(models, out)), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [n for _, _, names in os.walk(out) for n in names if n.endswith(".tmp")] == []
    assert listing(out) == listing(reference)


def test_bad_input_is_reported_once_and_every_rank_exits_non_zero(models, tmp_path):
    args = _distill_args(models, tmp_path / "out")
    args[args.index("--ve") + 1] = str(tmp_path / "missing_ve.safetensors")
    started = time.monotonic()
    result = subprocess.run(torchrun_command(2, args), env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert result.stderr.count("igds-fast: error:") == 1, result.stderr[-3000:]
    assert "missing_ve.safetensors" in result.stderr


def test_batch_invariant_folders_do_not_depend_on_batch_size_or_world_size(models, tmp_path):
    one = tmp_path / "one"
    args = _distill_args(models, one) + ["--batch-invariant"]
    assert run_distill(_parse(args)) == 0
    two = tmp_path / "two"
    args = _distill_args(models, two) + ["--batch-invariant"]
    args[args.index("--batch-size") + 1] = "8"
    result = subprocess.run(torchrun_command(2, args), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(two) == listing(one)


def test_a_ddim_folder_is_the_same_bytes_on_one_and_two_ranks(models, tmp_path):
    # DDIM with eta > 0: its noise is keyed by (seed, step) like DDPM's, so the world size changes no byte.
    ddim = ["--sampler", "ddim", "--eta", "0.5"]
    one = tmp_path / "one"
    assert run_distill(_parse(_distill_args(models, one) + ddim)) == 0
    two = tmp_path / "two"
    result = subprocess.run(torchrun_command(2, _distill_args(models, two) + ddim), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(two) == listing(one) and len(file_states(two)) == TOTAL
