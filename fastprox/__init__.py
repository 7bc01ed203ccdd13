"""fastprox: fused proximal operators for structured-sparsity training in PyTorch.

    >>> import fastprox
    >>> fastprox.group_shrink_(layer.weight, lr * lam, dim=0)   # after optimizer.step()

Operators (in place, return the weight): group_shrink_, soft_threshold_, sparse_group_shrink_,
exclusive_shrink_, cges_shrink_; foreach_prox_ (any of them on a list of tensors, in one
call); and group_norms. fastprox.reference holds the pure-PyTorch
oracle of each. DTensor weights (FSDP2, tensor parallelism) are accepted by every operator:
fastprox.distributed.
"""

from . import distributed, l0, reference
from .compaction import Compacted, compact
from .stats import SparsityHistory, SparsityStats, sparsity_stats
from .regularizer import CGESSchedule, Regularizer, Target
from .ops import (
    cges_shrink_,
    exclusive_shrink_,
    foreach_prox_,
    group_norms,
    group_shrink_,
    soft_threshold_,
    sparse_group_shrink_,
)

__version__ = "0.1.0"

__all__ = [
    "group_norms",
    "group_shrink_",
    "soft_threshold_",
    "sparse_group_shrink_",
    "exclusive_shrink_",
    "cges_shrink_",
    "foreach_prox_",
    "reference",
    "distributed",
    "Regularizer",
    "Target",
    "CGESSchedule",
    "compact",
    "Compacted",
    "l0",
    "sparsity_stats",
    "SparsityStats",
    "SparsityHistory",
]
