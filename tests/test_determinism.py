"""Bitwise-identical results from run to run and between 1 and 2 threads."""

import pytest
import torch

from helpers import OPS, random_weight, run


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_bitwise_identical_across_runs_and_threads(op, dtype, threads):
    # Sizes large enough to be split over threads (and over column tiles).
    layouts = [((512, 384), None), ((512, 384), 0), ((64, 48, 3, 3), (0, 2, 3)), ((2, 70000), None),
               ((24, 9001), 0)]
    for shape, dim in layouts:
        if not op.grouped and dim is not None:
            continue
        w = random_weight(shape, dtype)
        results = []
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            x = w.clone()
            run(op, x, dim=dim)
            results.append(x)
        assert results[0].view(torch.int16 if dtype.itemsize == 2 else torch.int32).equal(
            results[1].view(torch.int16 if dtype.itemsize == 2 else torch.int32))
        assert results[0].view(torch.int16 if dtype.itemsize == 2 else torch.int32).equal(
            results[2].view(torch.int16 if dtype.itemsize == 2 else torch.int32))
