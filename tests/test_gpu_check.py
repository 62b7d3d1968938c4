"""bench/gpu_check.sh against the device tool's limits, on CPU: its files, its clock, its plan.

The device returns at most 8 files from $OUT and stops a command at its timeout_s; a GPU call must
still bring back every number it measured. `--cpu-smoke` runs call 1's parts with the tiny presets
(the same files and archive), a part stopped at a tiny budget must leave its finished rows in the
archive, and `--dry-run` must refuse a plan that would not fit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES_BACK = 8  # the device tool returns at most this many files from $OUT

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout is not installed")


def gpu_check(tmp_path, *args, env=None, timeout=300):
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "IGDS_GPU_CHECK_WORK": str(tmp_path / "work"),
                   "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def archive_members(tmp_path) -> dict[str, bytes]:
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def returned_files(tmp_path) -> list[str]:
    """What the device would bring back: every file under $OUT (it takes two folders deep)."""
    out = tmp_path / "out"
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())


def test_cpu_smoke_runs_call_1_into_a_summary_and_one_archive(tmp_path):
    result = gpu_check(tmp_path, "--cpu-smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert returned_files(tmp_path) == ["SUMMARY.md", "gpu_check.tar.gz"]
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    for part in ("env", "adm256", "gputests"):
        assert f"| {part} | ok | 0 | " in summary, summary
    assert "| gputests-compiled | not in this run: call 2 (timeout_s 150) |" in summary
    assert "mode: CPU smoke" in summary and "SKIPPED" in summary  # pytest -v's upper-case lines reach it
    assert "[bench] tiny/compiled/B2:" in summary and "compiled backend: compiling the UNet" in summary
    members = archive_members(tmp_path)
    for name in ("setup.log", "env.log", "adm256.log", "gputests.log", "gpu_tests.xml", "sampler_adm256.json",
                 "sampler_adm256.md", "SUMMARY.md"):
        assert f"gpu_check/{name}" in members, sorted(members)
    rows = json.loads(members["gpu_check/sampler_adm256.json"])["rows"]
    variants = [row["variant"] for row in rows]
    assert variants[:2] == ["compiled", "eager-fp32"] and "eager-bf16" in variants  # the headline first
    peers_importable = importlib.util.find_spec("guided_diffusion") is not None
    assert all("ms_per_step" in row for row in rows if peers_importable or row["variant"] != "gd-fp16"), rows
    assert json.loads(members["gpu_check/sampler_adm256.json"])["fidelity"]


STALL = '''import runpy, sys, time
import bench.timing
real = bench.timing.time_steps
calls = []


def stalling(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second variant never ends: only the part's time limit stops it
        time.sleep(3600)
    return real(*args, **kwargs)


bench.timing.time_steps = stalling
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_a_part_stopped_at_a_tiny_budget_keeps_its_finished_rows_in_the_archive(tmp_path):
    # A python whose bench/sampler.py hangs in its second variant; a 70 s budget stops the part.
    (tmp_path / "stall.py").write_text(STALL)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = bench/sampler.py ]; then export TRITON_INTERPRET=1; '
                       f'exec {sys.executable} {tmp_path / "stall.py"} "$@"; fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    result = gpu_check(tmp_path, "--cpu-smoke", "--parts", "adm256", "--budget", "70", env={"PYTHON": str(wrapper)},
                       timeout=200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert returned_files(tmp_path) == ["SUMMARY.md", "gpu_check.tar.gz"]
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "| adm256 | TIMEOUT | 124 | " in summary, summary
    clock = int(summary.split("- clock: ")[1].split(" s")[0])
    assert clock <= 70 - 10  # summary and archive written inside the budget, less its safety margin
    members = archive_members(tmp_path)
    rows = json.loads(members["gpu_check/sampler_adm256.json"])["rows"]
    assert [row["variant"] for row in rows] == ["compiled"] and rows[0]["ms_per_step"] > 0
    assert "| tiny | compiled | 2 |" in members["gpu_check/sampler_adm256.md"].decode()


def dry_run(tmp_path, plan: str | None = None):
    env = {}
    if plan is not None:
        (tmp_path / "plan.sh").write_text(plan)
        env["IGDS_GPU_CHECK_PLAN"] = str(tmp_path / "plan.sh")
    return gpu_check(tmp_path, "--dry-run", env=env, timeout=120)


def test_dry_run_prints_the_calls_with_their_files_clock_and_commands(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[plan] call 1 (timeout_s 540, session A: the first call of a session with a GPU): env 20 s, " \
           "adm256 300 s, gputests 60 s" in out
    assert "estimate 410 s (setup 15 + parts + 5 s each) <= 530 s; files back 2 <= 8" in out
    assert "[plan] session A: start 120 s + its calls' timeout_s + 20 s transfers each = 850 s <= 900 s" in out
    adm256 = next(line for line in out.splitlines() if line.startswith("[plan]   adm256 "))
    assert "--variants graphs,eager-fp32,gd-fp16,compiled,eager-half" in adm256 and "--check-fidelity" in adm256
    assert '{"self_check": false, "attention": "sdpa"}' in adm256 and "--json $R/sampler_adm256.json" in adm256
    cheap = next(line for line in out.splitlines() if line.startswith("[plan]   gputests "))
    assert "--timeout=60" in cheap and cheap.index("test_kernels_philox") < cheap.index("test_fused_step")
    assert "test_compiled" not in cheap
    assert "--timeout=120" in next(line for line in out.splitlines() if "gputests-compiled call 2" in line)
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "| adm256 | planned (dry run): call 1 |" in summary and "| adm256-ma | planned (dry run): call 4 |" in summary
    assert returned_files(tmp_path) == ["SUMMARY.md"]


@pytest.mark.parametrize("plan, message", [
    ('PLAN=("${PLAN[@]/env:1:20:60:0/env:1:20:60:7}")\n', "call 1 would leave 9 files in $OUT; the device returns 8"),
    ('PLAN=("${PLAN[@]/adm256:1:300:420:0/adm256:1:430:420:0}")\n', "call 1's estimate 540 s exceeds"),
    ('PLAN=("${PLAN[@]/adm256:1:300:420:0/adm256:1:300:520:0}")\n', "part adm256's limit 520 s does not fit"),
    ('CALLS=("${CALLS[@]/1:540:A/1:700:A}")\n', "call 1's timeout_s 700 s exceeds the device's 600 s"),
    ('CALLS=("${CALLS[@]/2:150:A/2:240:A}")\n', "session A needs 940 s of device time"),
], ids=["nine-files", "over-timeout", "part-over-call", "over-600-s", "session-over-900-s"])
def test_dry_run_refuses_a_plan_that_does_not_fit(tmp_path, plan, message):
    result = dry_run(tmp_path, plan)
    assert result.returncode == 1 and message in result.stderr, result.stdout[-2000:] + result.stderr
    # the clock's own margins hold even so: the estimate line is printed for every call
    assert result.stdout.count("files back") == 7
