"""sparse_group_shrink_(W, lam_l1, lam_group, dim, size_weighted) on CUDA, the sparse group
lasso prox (Friedman, Hastie, Tibshirani 2010), fused in one pass:
    V <- sign(W) max(|W| - lam_l1, 0);   W_g <- s_g V_g,  s_g = max(1 - t / ||V_g||, 0)
with t = lam_group * c. Contract: fastprox/ops.py; reference: fastprox/reference.py; CPU:
csrc/cpu/sparse_group_shrink.cpp; kernel: kernels/group_engine.py.
"""

from __future__ import annotations

from . import _op


def sparse_group_shrink_(weight, lam_l1, lam_group, dim, size_weighted):
    dims = _op.checked(weight, dim, "sparse_group_shrink_")
    _op.step(weight, dims, lam_l1, lam_group, size_weighted=size_weighted)
