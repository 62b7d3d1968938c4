#!/usr/bin/env bash
# The peers' own code for the front-end tests (tests/peers.py): each repository exported at its pinned
# commit into tests/.peers/<name>/ (or $IGDS_PEERS/<name>/). Test-only references: git-ignored, never
# committed. Needs network access to GitHub; without it the peer tests skip, saying so.
set -euo pipefail
cd "$(dirname "$0")"
dest="${IGDS_PEERS:-.peers}"
python - "$dest" <<'PY'
import os, subprocess, sys, tempfile
sys.path.insert(0, ".")
from peers import PINS
dest = sys.argv[1]
for name, (repository, commit) in PINS.items():
    target = os.path.join(dest, name)
    stamp = os.path.join(target, "PEER_COMMIT")
    if os.path.isfile(stamp) and commit in open(stamp).read():
        print(f"{name}: {repository} @ {commit[:10]} already there")
        continue
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["git", "init", "-q", work], check=True)
        subprocess.run(["git", "-C", work, "fetch", "-q", "--depth", "1", f"https://github.com/{repository}", commit],
                       check=True)
        os.makedirs(target, exist_ok=True)
        archive = subprocess.run(["git", "-C", work, "archive", "FETCH_HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    with open(stamp, "w") as handle:
        handle.write(f"{repository} {commit}\n")
    print(f"{name}: {repository} @ {commit[:10]} -> {target}")
PY
