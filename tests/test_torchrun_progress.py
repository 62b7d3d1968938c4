"""One progress line for a torchrun distill: rank 0 prints the whole job's count (issue 15, item 3).

Before: every rank drew its own line over the job's total (two start lines, two lines ending near
8/16, the ETA twice too long). Now rank 0 alone prints, summing the ranks' images (ProgressRounds).
"""
import json
import re
import subprocess

from test_distill import _distill_args, models  # noqa: F401 (fixture)
from test_distill_torchrun import ENV, TOTAL, torchrun_command

PROGRESS_LINE = re.compile(r"^distill (\d+(?:\.\d)?)/(\d+) img \((\d+)%\) [\d.]+ img/s ETA \S+$")


def test_two_ranks_print_one_progress_line_with_both_ranks_images(models, tmp_path):  # noqa: F811
    args = [a for a in _distill_args(models, tmp_path / "out") if a != "--quiet"]  # progress on
    # 6 images a batch: batches of 6, 6 and 4 images, so rank 0 has two and rank 1 one — the progress
    # rounds must pair up across unequal shares (a collective one rank never joins would hang).
    args[args.index("--batch-size") + 1] = "24"
    result = subprocess.run(torchrun_command(2, args), env=ENV, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.strip() for line in result.stderr.splitlines()]
    found = [PROGRESS_LINE.match(line) for line in lines]
    counts = [float(match.group(1)) for match in found if match]
    assert counts, result.stderr[-3000:]
    assert {int(match.group(2)) for match in found if match} == {TOTAL}
    # one line from one rank: one start, one end at the job's total, never going back
    assert counts[0] == 0 and counts.count(0) == 1, counts
    assert counts[-1] == TOTAL and counts.count(TOTAL) == 1, counts
    assert counts == sorted(counts), counts
    assert sum(line.startswith("distill: 4 classes x IPC 4") for line in lines) == 1  # one header too
    assert "on 2 ranks" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["images_written"] for r in manifest["run"]["ranks"]] == [10, 6]
