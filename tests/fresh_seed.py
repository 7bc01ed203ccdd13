"""Fresh random inputs on every run, with the seed printed on failure to replay it: the autouse
fixture and report hook that tests/conftest.py and tests_kernels/conftest.py both import."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and "_fresh_seed" in item.fixturenames:
        seed = item.funcargs.get("_fresh_seed")
        if seed is not None:
            item.add_report_section(call.when, "seed", f"torch.manual_seed({seed})")
