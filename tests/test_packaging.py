"""Packaging: pyproject.toml (PEP 621) declares what the wheel ships; the version is written in one place.

Cheap checks on the files themselves (no pip, no build): the `kernels/` and `profiling/` mapping, the
package list against the source tree, the data files, the dependency markers, the extras `.ci/run`
installs, and that the build reads the version without importing igds_fast (or torch).
"""
import ast
import fnmatch
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the test extras need nothing more


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)


def test_the_version_is_written_once_and_read_statically(pyproject):
    import igds_fast
    from igds_fast import _version

    assert pyproject["project"]["dynamic"] == ["version"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "igds_fast._version.__version__"}
    assert igds_fast.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version.__version__)
    # setuptools reads a plain assignment off the syntax tree: nothing in the file to import (torch).
    with open(os.path.join(ROOT, "igds_fast", "_version.py"), encoding="utf-8") as handle:
        body = ast.parse(handle.read()).body
    assert not [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [target.id for node in body if isinstance(node, ast.Assign) for target in node.targets] == ["__version__"]
    # No second copy of the number anywhere in the package sources or the build files.
    candidates = [os.path.join(ROOT, name) for name in ("pyproject.toml", "setup.py", "setup.cfg")]
    for folder in ("igds_fast", "kernels", "profiling"):
        for directory, _, names in os.walk(os.path.join(ROOT, folder)):
            candidates += [os.path.join(directory, name) for name in names
                           if name.endswith(".py") and name != "_version.py"]
    assert [path for path in candidates if os.path.isfile(path) and f'"{_version.__version__}"' in _read(path)] == []


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def test_the_package_list_and_the_kernels_profiling_mapping_cover_the_tree(pyproject):
    from setuptools import find_packages

    tool = pyproject["tool"]["setuptools"]
    assert tool["package-dir"] == {"igds_fast.kernels": "kernels", "igds_fast.profiling": "profiling"}
    for folder in tool["package-dir"].values():
        assert os.path.isfile(os.path.join(ROOT, folder, "__init__.py"))
    # Every subpackage of igds_fast/ is listed (a new one left out would be missing from the wheel).
    in_tree = find_packages(where=ROOT, include=["igds_fast", "igds_fast.*"])
    assert sorted(tool["packages"]) == sorted(in_tree + ["igds_fast.kernels", "igds_fast.profiling"])
    assert not [name for name in ("kernels", "profiling") if name in tool["packages"]]  # never top-level


def test_the_data_files_are_package_data(pyproject):
    patterns = pyproject["tool"]["setuptools"]["package-data"]["igds_fast"]
    assert sorted(patterns) == ["data/*.json", "data/*.safetensors", "data/*.txt"]
    names = os.listdir(os.path.join(ROOT, "igds_fast", "data"))
    assert {"imagenet1k_wnids.txt", "tinyimagenet.txt", "cifar10.txt", "sources.json", "digits_prior.safetensors",
            "digits_prior.json"} <= set(names)
    # igds_fast/data/ is also the data package (its modules ship as code): every other file is package data.
    files = [name for name in names if not name.endswith(".py") and name != "__pycache__"]
    unshipped = [name for name in files if not any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns)]
    assert unshipped == []


def test_dependencies_triton_on_linux_only_no_nvtx_extra_and_the_ci_extras_exist(pyproject):
    project = pyproject["project"]
    (triton,) = [dep for dep in project["dependencies"] if dep.startswith("triton")]
    assert triton.replace('"', "'").replace(" ", "") == "triton>=3.0;platform_system=='Linux'"
    from packaging.requirements import Requirement  # pytest's own dependency

    marker = Requirement(triton).marker
    assert [marker.evaluate({"platform_system": system}) for system in ("Linux", "Darwin", "Windows")] == [
        True, False, False]
    extras = project["optional-dependencies"]
    assert "nvtx" not in extras
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci = handle.read()
    main, second = (set(found.split(",")) for found in re.findall(r'pip install -q -e "\.\[([a-z,]+)\]"', ci))
    assert main <= set(extras) and "test" in main  # the main environment
    assert second <= set(extras) and {"test", "torchvision"} <= second  # the torchvision one (tests marked so)


def test_setup_py_is_a_shim_over_pyproject():
    """setup.py exists for the tools that look for it, holds no metadata of its own, and setuptools reads
    the name and version from pyproject.toml through it."""
    path = os.path.join(ROOT, "setup.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert len(calls) == 1 and calls[0].func.id == "setup" and not calls[0].args and not calls[0].keywords
    result = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from igds_fast._version import __version__

    assert result.stdout.split()[-2:] == ["igds_fast", __version__]


def test_the_entry_point_resolves(pyproject):
    import importlib

    module, _, attribute = pyproject["project"]["scripts"]["igds-fast"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
