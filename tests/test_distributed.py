"""torch.distributed plumbing under torchrun with gloo on loopback."""
import json
import os
import socket
import subprocess
import sys


from igds_fast.distributed import DistContext, shard

SCRIPTS = os.path.join(os.path.dirname(__file__), "dist_scripts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, timeout=120):
    """torchrun on loopback only (a standalone rendezvous needing a network hangs where it is down)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_shard_deals_round_robin():
    items = list(range(10))
    shares = [shard(items, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == items
    assert shard(items, DistContext()) == items


def test_two_ranks_shard_and_gather(tmp_path):
    out = tmp_path / "gathered.json"
    result = torchrun(2, os.path.join(SCRIPTS, "collectives.py"), "good", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == [0, 1]
    assert gathered[0]["items"] == [0, 2, 4, 6, 8, 10] and gathered[1]["items"] == [1, 3, 5, 7, 9]
    assert all(g["status"] == "ok" for g in gathered)
    assert [g["agreed"] for g in gathered] == [33, 33]  # every rank gets the smallest offer (40, 33)


def test_bad_input_is_reported_once_and_every_rank_fails(tmp_path):
    result = torchrun(2, os.path.join(SCRIPTS, "collectives.py"), "bad", str(tmp_path / "x.json"))
    assert result.returncode != 0
    assert result.stderr.count("igds-fast: error: the VE file is missing") == 1


def test_a_rank_that_finishes_early_waits_at_the_end_gather_beyond_the_collective_timeout(tmp_path):
    out = tmp_path / "gathered.json"
    result = torchrun(2, os.path.join(SCRIPTS, "collectives.py"), "late", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [g["rank"] for g in json.loads(out.read_text())] == [0, 1]
