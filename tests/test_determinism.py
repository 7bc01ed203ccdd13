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
    # Sizes large enough to be split over threads (and over column blocks and chunks).
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
        bits = [r.view(torch.int16 if dtype.itemsize == 2 else torch.int32) for r in results]
        assert bits[0].equal(bits[1]), "two runs differ"
        assert bits[0].equal(bits[2]), "1 and 2 threads differ"
