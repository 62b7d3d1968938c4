"""igds_fast runs from an uninstalled source checkout (the GPU machines have no network for pip)."""
import os
import shutil
import subprocess
import sys

from igds_fast import _source_checkout_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Drop an editable install's finder (setuptools' _EditableFinder maps igds_fast.kernels to this
# checkout), so only the copy under test can answer the imports.
PROBE = """
import sys
sys.meta_path = [f for f in sys.meta_path if 'Editable' not in type(f).__name__ and 'editable' not in str(f)]
import igds_fast.kernels, igds_fast.profiling, igds_fast.sampling.compiled.step
print(igds_fast.__file__)
print(igds_fast.kernels.__file__)
print(igds_fast.profiling.__file__)
"""


def test_an_uninstalled_checkout_imports_its_kernels_and_profiling(tmp_path):
    checkout = tmp_path / "checkout"
    for folder in ("igds_fast", "kernels", "profiling"):
        shutil.copytree(os.path.join(ROOT, folder), checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), checkout / "pyproject.toml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    package, kernels, profiling = result.stdout.split()
    assert package == str(checkout / "igds_fast" / "__init__.py")
    assert kernels == str(checkout / "kernels" / "__init__.py")
    assert profiling == str(checkout / "profiling" / "__init__.py")


def test_an_installed_layout_is_left_alone(tmp_path):
    installed = tmp_path / "site-packages" / "igds_fast"
    (installed / "kernels").mkdir(parents=True)
    (tmp_path / "site-packages" / "pyproject.toml").write_text("")
    assert _source_checkout_root(str(installed)) is None
    assert _source_checkout_root(os.path.join(ROOT, "igds_fast")) == ROOT
    stray = tmp_path / "elsewhere" / "igds_fast"  # no kernels/ beside it: nothing to add
    stray.mkdir(parents=True)
    assert _source_checkout_root(str(stray)) is None
