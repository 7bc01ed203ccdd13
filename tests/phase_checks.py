"""The phase ops (foreach_group_sums, foreach_group_sums_above, foreach_group_rewrite_) against
their float64-capable reference: shared by the C++ kernels' tests (tests/test_coupled.py) and the
Triton kernels' (tests_kernels/test_phases.py)."""

from __future__ import annotations

import torch

from fastprox import reference
from helpers import TOLERANCES

# rows, columns, conv filters and input channels, elementwise, tall columns, empty
PHASE_LAYOUTS = [((64, 33), [1]), ((64, 33), [0]), ((8, 6, 3, 3), [0, 2, 3]),
                 ((8, 6, 3, 3), [1, 2, 3]), ((17,), []), ((5, 300), [0]), ((0, 4), [1]),
                 ((3, 4, 5, 6), [1, 3])]


def phase_inputs(dtype, device):
    """Weights of every layout (a NaN in each, transposed views of the 2-D ones) and their dims."""
    weights, dims = [], []
    for shape, dim in PHASE_LAYOUTS:
        w = torch.randn(shape).to(dtype)
        if w.numel():
            w.view(-1)[0] = float("nan")  # NaN stays in its group's sums
        weights.append(w.to(device))
        dims.append(dim)
        if len(shape) == 2:
            weights.append(torch.randn(shape[::-1]).to(dtype).to(device).t())  # transposed
            dims.append(dim)
    return weights, dims


def check_phase_ops(ops, dtype, device):
    """Every layout in one call, against the reference on CPU copies."""
    weights, dims = phase_inputs(dtype, device)
    flat, counts = [d for ds in dims for d in ds], [len(ds) for ds in dims]
    cpu = [w.cpu() for w in weights]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    close = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    for l1 in (0.0, 0.3):
        lams = [l1] * len(weights)
        for what in (1, 2, 3):
            mine = ops.foreach_group_sums(weights, flat, counts, lams, what)
            ref = reference.foreach_group_sums_op(cpu, flat, counts, lams, what)
            for a, b in zip(mine, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a.cpu(), b, **close)
        kept = [reference.group_sums_op(w, d, 0.0, 1)[0].shape for w, d in zip(cpu, dims)]
        scales = [torch.rand(k, dtype=acc) for k in kept]
        taus = [torch.rand(k, dtype=acc) * 0.5 for k in kept]
        on = [[None if v is None else v.to(device) for v in vs] for vs in (scales, taus)]
        for ss in (scales, [None] * len(kept)):
            mine = ops.foreach_group_sums_above(
                weights, flat, counts, lams, [None if s is None else s.to(device) for s in ss],
                on[1])
            ref = reference.foreach_group_sums_above_op(cpu, flat, counts, lams, ss, taus)
            for a, b in zip(mine, ref):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a.cpu(), b, **close)
        nothing = [None] * len(kept)
        for ss, ts in ((scales, nothing), (nothing, taus), (scales, taus), (nothing, nothing)):
            mine = [w.clone() for w in weights]
            ref = [w.clone() for w in cpu]
            ops.foreach_group_rewrite_(mine, flat, counts, lams,
                                       [None if s is None else s.to(device) for s in ss],
                                       [None if t is None else t.to(device) for t in ts])
            reference.foreach_group_rewrite_op(ref, flat, counts, lams, ss, ts)
            for a, b, w in zip(mine, ref, cpu):
                if l1 == 0 and ss is nothing and ts is nothing:  # nothing to do: bit-identical
                    assert torch.equal(_bits(a.cpu()), _bits(w))
                torch.testing.assert_close(a.cpu(), b, **TOLERANCES[dtype], equal_nan=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])
