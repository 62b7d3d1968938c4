import os
import sys

# Triton kernels run on CPU through the interpreter; this must be set before any kernel module
# (or triton itself) is imported, so it lives at the very top of the test session.
if os.environ.get("IGDS_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# MKL's reproducible code path, before torch (and with it MKL) loads: on AVX-512 CPUs MKL's default
# GEMMs round differently with the operands' memory alignment, which the bit-identity tests forbid.
# Recorded so that a test can tell whether the mode was in force when torch loaded.
TORCH_IMPORTED_BEFORE_CONFTEST = "torch" in sys.modules
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng_seed(request):
    """A fresh seed per test run (printed on failure) so tests never rely on one fixed input."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores a second OpenMP thread makes tiny models 3-20x slower.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with IGDS_TEST_GPU=1 on a GPU machine)")
