"""exclusive_shrink_(W, lam, dim, exact) on CUDA, the exclusive lasso prox:
    W_g <- sign(W_g) max(|W_g| - tau, 0),   tau = lam * sum_i max(|w_i| - tau, 0)   (exact)
found on chip by Newton's method from 0 (SPEC.md; no sort), or CGES's bound tau = lam ||W_g||_1
(exact=False). Contract: fastprox/ops.py; reference: fastprox/reference.py; CPU:
csrc/cpu/exclusive_shrink.cpp; kernel: kernels/group_engine.py.
"""

from __future__ import annotations

from . import _op


def exclusive_shrink_(weight, lam, dim, exact):
    dims = _op.checked(weight, dim, "exclusive_shrink_")
    _op.step(weight, dims, lam_exclusive=lam, exact=exact,
             names=("lam_l1", "lam_group", "lam"))
