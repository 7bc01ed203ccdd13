"""The Triton backend: the CUDA kernels of the ops (fastprox.kernels, installed from kernels/),
each behind the checks of the weights it is handed.

A kernel of an op is reached by any ``torch.ops.fastprox`` call, not only through the public
API, so each entry here first checks what the CPU kernels check in C++
(csrc/cpu/group_layout.cpp): every weight a strided float tensor, its dims valid, the weights on
one device and, for an op that writes, no element shared within or between weights. Nothing is
launched or written before. Then the kernels' own entry runs; it checks its tables (thresholds,
metric, moments) itself. fastprox/_registry.py registers ``ENTRIES`` as the ops' CUDA kernels,
and, on request, as their CPU kernels (Triton's interpreter, for the tests).
"""

from __future__ import annotations

from . import _checks

try:
    from . import kernels
except ImportError:  # no Triton
    kernels = None


def group_norms(weight, dim):
    _checks.check_weight(weight, "group_norms")
    _checks.normalize_dim(list(dim), weight, "group_norms")
    return kernels.group_norms(weight, dim)


def foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact,
                  caller="foreach_prox_", lam_names=None):
    _checks.check_op_weights(caller, weights, dims, dim_counts, writes=True)
    return kernels.foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact, caller,
                                 lam_names)


def foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted,
                         exact, names=None, moments_checked=False):
    _checks.check_op_weights("foreach_metric_prox_", weights, dims, dim_counts, writes=True)
    return kernels.foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts,
                                        size_weighted, exact, names, moments_checked)


def foreach_group_sums(weights, dims, dim_counts, lam_l1, what):
    _checks.check_op_weights("foreach_group_sums", weights, dims, dim_counts, writes=False)
    return kernels.foreach_group_sums(weights, dims, dim_counts, lam_l1, what)


def foreach_group_sums_above(weights, dims, dim_counts, lam_l1, scales, taus):
    _checks.check_op_weights("foreach_group_sums_above", weights, dims, dim_counts,
                             writes=False)
    return kernels.foreach_group_sums_above(weights, dims, dim_counts, lam_l1, scales, taus)


def foreach_group_rewrite_(weights, dims, dim_counts, lam_l1, scales, taus):
    _checks.check_op_weights("foreach_group_rewrite_", weights, dims, dim_counts, writes=True)
    return kernels.foreach_group_rewrite_(weights, dims, dim_counts, lam_l1, scales, taus)


def coupled_metric_prox_(members, moments, axes, metric, set_sizes, slices, starts,
                         thresholds, lam_l1, lam_exclusive, exact, direct=False, names=None,
                         moments_checked=False):
    _checks.check_coupled_members("coupled_metric_prox_", members, set_sizes)
    return kernels.coupled_metric_prox_(members, moments, axes, metric, set_sizes, slices,
                                        starts, thresholds, lam_l1, lam_exclusive, exact,
                                        direct, names, moments_checked)


# op name -> its checked Triton kernel (every op of csrc/fastprox.cpp)
ENTRIES = {fn.__name__: fn for fn in (group_norms, foreach_prox_, foreach_metric_prox_,
                                      foreach_group_sums, foreach_group_sums_above,
                                      foreach_group_rewrite_, coupled_metric_prox_)}
