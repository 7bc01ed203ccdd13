"""group_norms(W, dim) on CUDA: ||W_g||_2 per group, shaped like the kept dimensions of W.

Sum of squares in float32 for 16-bit weights, in the weight's type otherwise; the result has the
weight's dtype. Contract: docs/SPEC.md; reference: fastprox/reference.py; CPU:
csrc/cpu/group_norms.cpp. Kernel: prox_kernel with NORMS_ONLY (kernels/prox_kernels.py).
"""

from __future__ import annotations

from . import launch
from .tables import split_dims


def group_norms(weight, dim):
    return launch.group_norms(weight, split_dims([weight], dim, [len(dim)])[0])
