"""pytest plugin that keeps only the GPU tests: `python -m pytest -p igds_fast.profiling.pytest_gpu_select`.

A test is a GPU test when it carries the `gpu` marker (tests/conftest.py registers it) or a skipif
marker whose reason names CUDA or a GPU — the suite's `gpu_only = pytest.mark.skipif(..., reason="needs
a CUDA GPU ...")` convention, which not every GPU test pairs with the marker. bench/gpu_check.sh runs
every GPU test of the suite with it (IGDS_TEST_GPU=1: compiled Triton, no interpreter), without the
CPU tests, which expect TRITON_INTERPRET=1 and CPU tensors.
"""
from __future__ import annotations

import re

_GPU_REASON = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def is_gpu_test(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    return any(_GPU_REASON.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    selected = [item for item in items if is_gpu_test(item)]
    deselected = [item for item in items if not is_gpu_test(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
