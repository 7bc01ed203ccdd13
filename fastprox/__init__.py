"""fastprox: fused proximal operators for structured-sparsity training in PyTorch.

    >>> import fastprox
    >>> fastprox.group_shrink_(layer.weight, lr * lam, dim=0)   # after optimizer.step()

Operators (in place, return the weight): group_shrink_, soft_threshold_, sparse_group_shrink_,
exclusive_shrink_, cges_shrink_; foreach_prox_ (any of them on a list of tensors, in one
call); foreach_metric_prox_ (the same steps in an Adam step's metric); and group_norms: one row each of the table in fastprox.operators.
fastprox.reference holds the pure-PyTorch oracle of each. DTensor weights (FSDP2, tensor
parallelism) are accepted by every operator: fastprox.distributed.
"""

from . import coupled, distributed, groups, l0, metric, operators, reference
from ._attention import HeadPrunedAttention
from .coupled import CoupledGroups, Slice
from .compaction import Compacted, compact, load_compact, recalibrate_batchnorm, save_compact
from .hf.export import save_pretrained_compact
from .saving import load, save
from .stats import CoupledStats, SparsityHistory, SparsityStats, coupled_stats, sparsity_stats
from .regularizer import CGESSchedule, CoupledTarget, Regularizer, Target
from .target import SparsityTarget
from . import ops as _ops

# the operators, one per row of the table (fastprox/operators.py)
globals().update({_name: getattr(_ops, _name) for _name in _ops.__all__})

__version__ = "0.1.0"

__all__ = [
    *_ops.__all__,
    "operators",
    "reference",
    "distributed",
    "coupled",
    "CoupledGroups",
    "Slice",
    "Regularizer",
    "Target",
    "CoupledTarget",
    "CGESSchedule",
    "SparsityTarget",
    "metric",
    "compact",
    "Compacted",
    "groups",
    "save",
    "load",
    "save_compact",
    "load_compact",
    "save_pretrained_compact",
    "recalibrate_batchnorm",
    "HeadPrunedAttention",
    "l0",
    "sparsity_stats",
    "SparsityStats",
    "SparsityHistory",
    "coupled_stats",
    "CoupledStats",
]
