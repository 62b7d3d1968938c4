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

# At most 2 intra-op threads (a shared 2-core machine), split between pytest-xdist's workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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


# CI's second environment (.ci/run) sets this: there the torchvision tests must run, so a torchvision
# that does not import is an error, not a skip.
REQUIRE_TORCHVISION = os.environ.get("IGDS_REQUIRE_TORCHVISION", "0") == "1"
TORCHVISION_SKIP = "the torchvision extra is not installed"  # tests/soft_data.torchvision_or_skip's skip reason


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with IGDS_TEST_GPU=1 on a GPU machine)")
    config.addinivalue_line("markers", "torchvision: builds torchvision networks (needs the torchvision extra; CI runs "
                            "them in a second environment, .ci/run)")
    if REQUIRE_TORCHVISION:
        try:
            import torchvision  # noqa: F401
        except Exception as error:  # ImportError, or torchvision's operator registration failing beside this torch
            raise pytest.UsageError(f"IGDS_REQUIRE_TORCHVISION=1 but torchvision does not import: {error}") from error


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips for want of torchvision must carry the `torchvision` marker: CI's main environment
    skips it and its second one selects it by the marker, so an unmarked one would run nowhere."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "torchvision" not in item.keywords and TORCHVISION_SKIP in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skips for want of torchvision but is not marked @pytest.mark.torchvision: "
                           "no CI environment would run it")
