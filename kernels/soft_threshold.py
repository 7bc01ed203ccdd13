"""soft_threshold_(W, lam) on CUDA, the lasso prox, elementwise:
    w <- sign(w) * max(|w| - lam, 0)        (NaN stays NaN, +-inf stays +-inf)
over the memory span of a dense weight. Contract: fastprox/ops.py; reference:
fastprox/reference.py; CPU: csrc/cpu/soft_threshold.cpp; kernel: soft_threshold_kernel in
kernels/group_engine.py.
"""

from __future__ import annotations

from .. import _checks
from . import launch


def soft_threshold_(weight, lam):
    _checks.check_weight(weight, "soft_threshold_")
    launch.check_writable(weight)
    launch.soft_threshold_(weight, lam)
