"""The GPU kernels' tests: on a CUDA machine they run the kernels through the public API on CUDA
tensors; without one, under Triton's interpreter on small CPU tensors (TRITON_INTERPRET=1 must
be set before triton is imported, hence a pytest invocation of its own: see the Makefile)."""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

if not INTERPRET and not torch.cuda.is_available():
    pytest.exit("tests_kernels needs a CUDA device or TRITON_INTERPRET=1 (see the Makefile)",
                returncode=2)

from fresh_seed import _fresh_seed, pytest_runtest_makereport  # noqa: E402,F401
from kernel_calls import served_by_kernels  # noqa: E402


@pytest.fixture
def kernels_served():
    """The test reaches the Triton kernels through the public API (kernel_calls.py)."""
    with served_by_kernels():
        yield


def pytest_configure(config):
    # The interpreter evaluates both sides of tl.where in numpy: 1/0 in a branch not taken.
    config.addinivalue_line("filterwarnings",
                            "ignore:divide by zero encountered:RuntimeWarning")
    config.addinivalue_line("filterwarnings",
                            "ignore:invalid value encountered:RuntimeWarning")
