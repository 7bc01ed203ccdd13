"""The GPU kernels' tests: on a CUDA machine they run the kernels through the public API on CUDA
tensors; without one, under Triton's interpreter on small CPU tensors (TRITON_INTERPRET=1 must
be set before triton is imported, hence a pytest invocation of its own: see the Makefile)."""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
# As in tests/conftest.py: the repository root (where `python -m pytest` runs) stays off
# sys.path, where its kernels/ would pass for the Hugging Face `kernels` package.
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

if not INTERPRET and not torch.cuda.is_available():
    pytest.exit("tests_kernels needs a CUDA device or TRITON_INTERPRET=1 (see the Makefile)",
                returncode=2)

from fresh_seed import _fresh_seed, pytest_runtest_makereport  # noqa: E402,F401
from kernel_calls import BACKENDS, served_by  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if "triton" in BACKENDS:
        return
    skip = pytest.mark.skip(reason="calls the Triton kernels directly (not in "
                                   "FASTPROX_TEST_BACKENDS)")
    for item in items:
        if "backend" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The test runs on each backend in turn, through the public API and the dispatcher
    (kernel_calls.py); a test marked ``triton_only`` (one of the Triton kernels' own launches,
    paths or entries) on the Triton kernels alone."""
    if request.param != "triton" and request.node.get_closest_marker("triton_only"):
        pytest.skip("a test of the Triton kernels' own launches and paths")
    with served_by(request.param):
        yield request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_only: runs on the Triton backend alone")
    # The interpreter evaluates both sides of tl.where in numpy: 1/0 in a branch not taken.
    config.addinivalue_line("filterwarnings",
                            "ignore:divide by zero encountered:RuntimeWarning")
    config.addinivalue_line("filterwarnings",
                            "ignore:invalid value encountered:RuntimeWarning")
