"""CI's two environments (.ci/run): the main one skips the tests that build torchvision networks, the
second selects them by the `torchvision` marker. A test that skips for want of torchvision without the
marker would run in neither, so tests/conftest.py fails it; IGDS_REQUIRE_TORCHVISION=1 (the second
environment) turns a torchvision that does not import into an error. Checked by running pytest on a
small folder with this suite's conftest.py and soft_data.py, torchvision hidden from the inner session."""
import os
import shutil
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
INNER = '''
import sys

import pytest

sys.modules["torchvision"] = None  # hidden: importing it raises ImportError, whatever is installed
from soft_data import torchvision_or_skip


def test_unmarked():
    torchvision_or_skip()


@pytest.mark.torchvision
def test_marked():
    torchvision_or_skip()
'''


def _inner_session(tmp_path, *args, require=False):
    for name in ("conftest.py", "soft_data.py"):
        shutil.copy(os.path.join(TESTS, name), tmp_path / name)
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {key: value for key, value in os.environ.items() if key != "IGDS_REQUIRE_TORCHVISION"}
    if require:
        env["IGDS_REQUIRE_TORCHVISION"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_an_unmarked_torchvision_skip_fails_and_a_marked_one_skips(tmp_path):
    result = _inner_session(tmp_path, "-rs")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 skipped" in result.stdout
    assert "test_unmarked skips for want of torchvision but is not marked @pytest.mark.torchvision" in result.stdout


def test_the_marker_selects_the_marked_test_and_the_second_environment_refuses_to_skip(tmp_path):
    selected = _inner_session(tmp_path, "-m", "torchvision")
    assert "1 skipped, 1 deselected" in selected.stdout, selected.stdout
    required = _inner_session(tmp_path, "-m", "torchvision", require=True)
    assert required.returncode != 0 and "1 skipped" not in required.stdout, required.stdout
