"""CPU benchmarks: each operator vs the eager reference vs torch.compile(reference) vs the
one-pass floor (an in-place ``w.mul_(c)`` on the same tensor: one read and one write).

    make bench            # or: pytest bench --benchmark-only

Weights: 8192x4096 with row groups (dim=1) and column groups (dim=0), and 512x512 (both), in
float32 and bfloat16. The weight is restored (untimed) before every round, so every round sees
the same values. The summary printed at the end (bench/conftest.py) gives medians, GB/s (one
read + one write of the weight; one read for group_norms) and ratios to the floor; it is also
written to bench/last-run-cpu.md.
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastprox
from fastprox import reference

SHAPES = {
    "8192x4096-rows": ((8192, 4096), 1),
    "8192x4096-cols": ((8192, 4096), 0),
    "512x512-rows": ((512, 512), 1),
    "512x512-cols": ((512, 512), 0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> (fused, reference, arguments after the weight; dim is passed as a keyword when grouped)
OPERATORS = {
    "group_norms": (fastprox.group_norms, reference.group_norms, ()),
    "group_shrink_": (fastprox.group_shrink_, reference.group_shrink_, (0.02,)),
    "soft_threshold_": (fastprox.soft_threshold_, reference.soft_threshold_, (0.5,)),
    "sparse_group_shrink_": (fastprox.sparse_group_shrink_, reference.sparse_group_shrink_,
                             (0.1, 0.02)),
    "exclusive_shrink_": (fastprox.exclusive_shrink_, reference.exclusive_shrink_, (1e-3,)),
    "exclusive_shrink_(exact=False)": (
        functools.partial(fastprox.exclusive_shrink_, exact=False),
        functools.partial(reference.exclusive_shrink_, exact=False), (1e-5,)),
    "cges_shrink_": (fastprox.cges_shrink_, reference.cges_shrink_, (0.02, 1e-3)),
}
IMPLS = ["fastprox", "reference", "compiled", "floor"]

_weights: dict = {}
_compiled: dict = {}


def _weight(shape_name: str, dtype_name: str) -> torch.Tensor:
    key = (shape_name, dtype_name)
    if key not in _weights:
        _weights.clear()  # keep one large weight alive at a time
        g = torch.Generator().manual_seed(0)
        _weights[key] = torch.randn(SHAPES[shape_name][0], generator=g).to(DTYPES[dtype_name])
    return _weights[key]


def _call(op_name: str, impl: str, dim: int):
    fused, ref, args = OPERATORS[op_name]
    grouped = op_name != "soft_threshold_"
    kwargs = {"dim": dim} if grouped else {}
    if impl == "fastprox":
        return lambda w: fused(w, *args, **kwargs)
    if impl == "reference":
        return lambda w: ref(w, *args, **kwargs)
    if impl == "compiled":
        key = (op_name, dim)
        if key not in _compiled:
            _compiled[key] = torch.compile(lambda w: ref(w, *args, **kwargs), dynamic=False)
        return _compiled[key]
    return lambda w: w.mul_(0.999)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_cpu(benchmark, op_name, shape_name, dtype_name, impl):
    shape, dim = SHAPES[shape_name]
    if op_name == "soft_threshold_" and dim == 0:
        pytest.skip("no groups: the row case covers it")
    source = _weight(shape_name, dtype_name)
    work = source.clone()
    fn = _call(op_name, impl, dim)
    restore = lambda: (work.copy_(source), None)[1]  # noqa: E731
    with torch.no_grad():
        fn(work)  # warm-up (and compilation) outside the timing
        restore()
        big = source.numel() >= 1 << 22
        slow = impl in ("reference", "compiled") and big
        benchmark.group = f"{op_name} {shape_name} {dtype_name}"
        benchmark.extra_info.update(
            op=op_name, shape=shape_name, dtype=dtype_name, impl=impl,
            bytes=source.numel() * source.element_size() * (1 if op_name == "group_norms" and
                                                             impl != "floor" else 2),
        )
        benchmark.pedantic(fn, args=(work,), setup=restore, rounds=5 if slow else 15,
                           warmup_rounds=0 if slow else 2)
