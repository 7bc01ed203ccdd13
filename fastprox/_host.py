"""The default backend: the ops on every device without kernels of its own (CUDA without
Triton, MPS, XPU, ...) run the C++ CPU kernels on host copies of their tensors, and in-place
ops write the results back into the device's tensors.

Results are the CPU kernels' exactly (the same rounding, deterministic). Each call moves its
tensors to the host and back (a synchronisation): correct everywhere, fast nowhere; a device
with many steps to run wants kernels of its own. The weights are checked where they are, before
anything is copied (a self-overlapping view, or two weights sharing memory, cannot be seen on a
copy); the CPU kernels check the rest.
"""

from __future__ import annotations

import torch

from . import _checks

ops = torch.ops.fastprox


def _host(t):
    """A host copy of ``t`` (always a copy: the device tensor is written only by write-back)."""
    return None if t is None else t.to("cpu", copy=True)


def _write_back(weights, copies) -> None:
    with torch.no_grad():
        for w, c in zip(weights, copies):
            w.copy_(c)


def group_norms(weight, dim):
    _checks.check_weight(weight, "group_norms")
    return ops.group_norms(_host(weight), dim).to(weight.device)


def foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact,
                  caller="foreach_prox_", lam_names=None):
    _checks.check_op_weights(caller, weights, dims, dim_counts, writes=True)
    copies = _per_weight(weights)
    ops.foreach_prox_(copies, _host(lams), dims, dim_counts, size_weighted, exact, caller,
                      lam_names)
    _write_back(weights, copies)


def _check_apart(op, moments, written, kind, names) -> None:
    """No moment may share memory with a tensor the op writes (seen only where they are, not
    on copies)."""
    for i, v in enumerate(moments):
        for j, w in enumerate(written):
            if _checks.shares_memory(v, w):
                label = names[i] if names is not None and i < len(names) else f"moments[{i}]"
                raise ValueError(f"{op}: {label} shares memory with {kind}[{j}], which the "
                                 "step writes")


def foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted,
                         exact, names=None, moments_checked=False):
    op = "foreach_metric_prox_"
    _checks.check_op_weights(op, weights, dims, dim_counts, writes=True)
    _check_apart(op, moments, weights, "weights", names)
    copies = _per_weight(weights)
    ops.foreach_metric_prox_(copies, _per_weight(moments), _host(lams), _host(metric),
                             dims, dim_counts, size_weighted, exact, names, moments_checked)
    _write_back(weights, copies)


def _per_weight(values):
    return [_host(v) for v in values]


def foreach_group_sums(weights, dims, dim_counts, lam_l1, what):
    _checks.check_op_weights("foreach_group_sums", weights, dims, dim_counts, writes=False)
    sums = ops.foreach_group_sums(_per_weight(weights), dims, dim_counts, lam_l1, what)
    return [s.to(w.device) for s, w in zip(sums, weights)]


def foreach_group_sums_above(weights, dims, dim_counts, lam_l1, scales, taus):
    _checks.check_op_weights("foreach_group_sums_above", weights, dims, dim_counts,
                             writes=False)
    sums = ops.foreach_group_sums_above(_per_weight(weights), dims, dim_counts, lam_l1,
                                        _per_weight(scales), _per_weight(taus))
    return [s.to(w.device) for s, w in zip(sums, weights)]


def foreach_group_rewrite_(weights, dims, dim_counts, lam_l1, scales, taus):
    _checks.check_op_weights("foreach_group_rewrite_", weights, dims, dim_counts, writes=True)
    copies = _per_weight(weights)
    ops.foreach_group_rewrite_(copies, dims, dim_counts, lam_l1, _per_weight(scales),
                               _per_weight(taus))
    _write_back(weights, copies)


def coupled_metric_prox_(members, moments, axes, metric, set_sizes, slices, starts,
                         thresholds, lam_l1, lam_exclusive, exact, direct=False, names=None,
                         moments_checked=False):
    """Every set checked on host copies first (nothing written), then set by set: its members
    copied, stepped and written back before the next set reads them (two sets may hold one
    tensor)."""
    op = "coupled_metric_prox_"
    _checks.check_coupled_members(op, members, set_sizes)
    _check_apart(op, moments, members, "members", names)
    host_moments = _per_weight(moments)
    tables = [_per_weight(slices), _per_weight(starts), _per_weight(thresholds)]
    ops.coupled_metric_prox_(_per_weight(members), host_moments, axes, _host(metric),
                             set_sizes, *tables, lam_l1, lam_exclusive, exact, direct,
                             names, moments_checked)  # the checks: raises before any write-back
    first = 0
    for j, size in enumerate(set_sizes):
        span = slice(first, first + size)
        first += size
        copies = _per_weight(members[span])
        ops.coupled_metric_prox_(copies, host_moments[span], axes[span], _host(metric[span]),
                                 [size], [tables[0][j]], [tables[1][j]], [tables[2][j]],
                                 [lam_l1[j]], [lam_exclusive[j]], [exact[j]], direct,
                                 None if names is None else names[span], True)
        _write_back(members[span], copies)


# op name -> its kernel on devices without their own (every op of csrc/fastprox.cpp)
ENTRIES = {fn.__name__: fn for fn in (group_norms, foreach_prox_, foreach_metric_prox_,
                                      foreach_group_sums, foreach_group_sums_above,
                                      foreach_group_rewrite_, coupled_metric_prox_)}
