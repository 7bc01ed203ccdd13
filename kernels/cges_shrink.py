"""cges_shrink_(W, lam_group, lam_exclusive, dim, size_weighted, exact) on CUDA, CGES's step
(Yoon & Hwang 2017): group shrink by lam_group * c, then exclusive shrink of the result by
lam_exclusive, fused in one pass. Contract: fastprox/ops.py; reference: fastprox/reference.py;
CPU: csrc/cpu/cges_shrink.cpp; kernel: kernels/group_engine.py.
"""

from __future__ import annotations

from . import _op


def cges_shrink_(weight, lam_group, lam_exclusive, dim, size_weighted, exact):
    dims = _op.checked(weight, dim, "cges_shrink_")
    _op.step(weight, dims, 0.0, lam_group, lam_exclusive, size_weighted=size_weighted,
             exact=exact)
