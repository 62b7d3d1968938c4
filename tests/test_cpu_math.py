"""MKL's reproducible mode (igds_fast.cpu_math): in force in the tests and under the CLI, before torch loads.

The alignment probe is the failure itself: on AVX-512 CPUs MKL's default GEMMs give other last bits
for the same operands at another address (on this project's AMD EPYC machines 48 of these 240
products differed with MKL_CBWR unset; with COMPATIBLE none does). Every bit-identity promise of the
product (batch-invariant mode, resume, world size) rests on it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import conftest
from igds_fast.cpu_math import REPRODUCIBLE_MODE, mkl_cbwr_branch, request_reproducible_cpu_math

# (m, k, n): guidance-head and classifier GEMMs (d = 512 / 2048, classes 10 / 1000), ADM's time
# embedding and attention projections, and odd sizes that leave remainder loops.
PROBE_SHAPES = [(1, 512, 10), (4, 512, 10), (1, 64, 192), (64, 64, 64), (2, 1152, 128), (1, 2048, 1000),
                (3, 300, 7), (256, 288, 32)]

# Imports torch inside the function: the CLI child below must load torch through the CLI first.
PROBE = '''
def products_that_depend_on_alignment(shapes, offsets=range(1, 16)):
    """How many (matmul, linear) results change when an operand is moved by `offset` floats."""
    import torch

    torch.manual_seed(0)
    changed = total = 0
    for m, k, n in shapes:
        a, b, w, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n, k), torch.randn(n)
        expected_mm, expected_linear = a @ b, torch.nn.functional.linear(a, w, bias)
        for offset in offsets:
            moved_a = torch.empty(m * k + offset)[offset:].view(m, k).copy_(a)
            moved_b = torch.empty(k * n + offset)[offset:].view(k, n).copy_(b)
            changed += not torch.equal(moved_a @ moved_b, expected_mm)
            changed += not torch.equal(torch.nn.functional.linear(moved_a, w, bias), expected_linear)
            total += 2
    return changed, total
'''
exec(PROBE)  # noqa: S102  (the same probe runs in this process and in the CLI subprocess below)


def test_gemm_results_do_not_depend_on_memory_alignment():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # CNR also needs a fixed thread count; one is what the CPU paths use
    try:
        changed, total = products_that_depend_on_alignment(PROBE_SHAPES)  # noqa: F821
    finally:
        torch.set_num_threads(previous)
    assert changed == 0, f"{changed} of {total} products changed with the operands' alignment (MKL_CBWR unset?)"


def test_the_reproducible_mode_was_set_before_torch_loaded():
    assert not conftest.TORCH_IMPORTED_BEFORE_CONFTEST, "torch was imported before tests/conftest.py set MKL_CBWR"
    assert os.environ.get("MKL_CBWR"), "MKL_CBWR is not set in the test process"
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    if os.environ["MKL_CBWR"] == REPRODUCIBLE_MODE:
        assert mkl_cbwr_branch() == "COMPATIBLE"  # read back from MKL itself: the mode is in force


def test_request_respects_the_users_choice_and_a_loaded_torch():
    environ = {"MKL_CBWR": "AVX2"}
    assert request_reproducible_cpu_math(environ) == "AVX2" and environ == {"MKL_CBWR": "AVX2"}
    environ = {}
    assert "torch" in sys.modules  # here MKL has read its environment already: nothing is set
    assert request_reproducible_cpu_math(environ) is None and environ == {}


CLI_CHILD = PROBE + '''
import os, sys
assert "torch" not in sys.modules
from igds_fast import cli
try:
    cli.main(["--version"])
except SystemExit:
    pass
assert "torch" in sys.modules  # the subcommand parsers loaded torch, after the entry set the mode
import torch
from igds_fast.cpu_math import mkl_cbwr_branch
torch.set_num_threads(1)
changed, total = products_that_depend_on_alignment({shapes})
print(os.environ.get("MKL_CBWR"), mkl_cbwr_branch(), changed, total)
'''


@pytest.mark.parametrize("user_value, expected_env, expected_branch", [
    (None, "COMPATIBLE", "COMPATIBLE"),
    ("AUTO", "AUTO", "AUTO"),  # a user's own choice is kept
])
def test_the_cli_entry_sets_the_mode_before_torch_loads(user_value, expected_env, expected_branch):
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    if user_value is not None:
        env["MKL_CBWR"] = user_value
    code = CLI_CHILD.format(shapes=PROBE_SHAPES)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    mode, branch, changed, total = result.stdout.split()[-4:]
    assert mode == expected_env
    if torch.backends.mkl.is_available():
        assert branch == expected_branch
    if user_value is None:
        assert int(changed) == 0, f"{changed} of {total} products changed with alignment under the CLI"
