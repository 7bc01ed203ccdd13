import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Random inputs are fresh each run; the seed is printed on failure to replay it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and "_fresh_seed" in item.fixturenames:
        seed = item.funcargs.get("_fresh_seed")
        if seed is not None:
            item.add_report_section(call.when, "seed", f"torch.manual_seed({seed})")
