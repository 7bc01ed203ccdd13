"""group_shrink_(W, lam, dim, size_weighted) on CUDA, the group lasso prox:
    W_g <- s_g W_g,   s_g = 0 if ||W_g|| <= t else 1 - t / ||W_g||,   t = lam * c
(c = sqrt(n) when size_weighted, else 1). Contract: fastprox/ops.py; reference:
fastprox/reference.py; CPU: csrc/cpu/group_shrink.cpp; kernel: kernels/group_engine.py.
"""

from __future__ import annotations

from . import _op


def group_shrink_(weight, lam, dim, size_weighted):
    dims = _op.checked(weight, dim, "group_shrink_")
    _op.step(weight, dims, lam_group=lam, size_weighted=size_weighted,
             names=("lam_l1", "lam", "lam_exclusive"))
