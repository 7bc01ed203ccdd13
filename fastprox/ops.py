"""The public operators, with their docstrings from the operator table (fastprox/operators.py).

``group_norms`` and ``foreach_prox_`` call the ops of the library (``torch.ops.fastprox``);
every in-place operator (``group_shrink_``, ``soft_threshold_``, ...) is a preset of the fused
step ``foreach_prox_`` on one tensor: its own checks, then the fused step with its thresholds.
DTensor weights go to fastprox/distributed.py. The math contract is docs/SPEC.md.
"""

from __future__ import annotations

import torch

from . import _checks, _fused, distributed
from .coupled import coupled_prox_
from .metric import foreach_metric_prox_
from ._registry import ops
from .operators import BY_NAME, COLUMNS, PRESETS


def group_norms(weight: torch.Tensor, dim=None) -> torch.Tensor:
    if _checks.is_dtensor(weight):
        return distributed.group_norms(weight, dim)
    _checks.check_weight(weight, "group_norms")
    return ops.group_norms(weight, _checks.normalize_dim(dim, weight, "group_norms"))


def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True):
    fn = "foreach_prox_"
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{fn}: weights must be a list or tuple of tensors, got "
                        f"{type(weights).__name__}")
    if any(_checks.is_dtensor(w) for w in weights):
        return distributed.foreach_prox_(weights, lam_l1=lam_l1, lam_group=lam_group,
                                         lam_exclusive=lam_exclusive, dim=dim,
                                         size_weighted=size_weighted, exact=exact)
    count = len(weights)
    for i, w in enumerate(weights):
        _checks.check_weight(w, fn, f"weights[{i}]")
        _checks.check_grad(w, fn, f"weights[{i}]")
        _checks.check_writable(w, fn, f"weights[{i}]")
        if w.device != weights[0].device:
            raise ValueError(f"{fn}: weights[{i}] is on {w.device} but weights[0] is on "
                             f"{weights[0].device}; call once per device")
    dims = _checks.per_tensor(dim, "dim", count, fn, _checks.is_dim_spec)
    dims = [_checks.normalize_dim(d, w, f"{fn}: weights[{i}]") for i, (d, w) in
            enumerate(zip(dims, weights))]
    columns = [_checks.per_tensor(value, name, count, fn, _checks.is_threshold)
               for name, value in zip(COLUMNS, (lam_l1, lam_group, lam_exclusive))]
    flags = [_checks.per_tensor(value, name, count, fn, lambda v: isinstance(v, bool))
             for name, value in (("size_weighted", size_weighted), ("exact", exact))]
    _fused.prox_(weights, columns, dims, *flags)
    return weights


# -- the presets of the fused step: one tensor, some of its three thresholds ---------------------
# Each checks its weight and flags under its own name, reads a threshold given as a 0-d CPU
# tensor on the host (_fused.host_number), and runs the fused step on [weight] with its
# thresholds in their columns (0 in the others: a sub-step the kernels skip). Signatures and
# docstrings follow the operator table's rows (fastprox/operators.py; tests/test_structure.py
# holds them to it).

_LAM_NAMES = {op.name: op.lam_names() for op in PRESETS}


_NO_GROUPS = object()  # the dim of a preset without groups


def _checked(weight, dim, fn: str) -> list[int]:
    """The checks of a preset's weight; its reduced dimensions."""
    _checks.check_weight(weight, fn)
    _checks.check_grad(weight, fn)
    _checks.check_writable(weight, fn)
    return [] if dim is _NO_GROUPS else _checks.normalize_dim(dim, weight, fn)


def _lam(value, name: str, weight, fn: str):
    return value if type(value) is float else _fused.host_number(value, name, weight, fn)


def _step(weight, table_named, dims, size_weighted: bool, exact: bool, fn: str):
    table, named = table_named
    args = ([weight], table, dims, [len(dims)], [size_weighted], [exact])
    if named:  # values the kernel checks: it names them as this preset does
        ops.foreach_prox_(*args, fn, _LAM_NAMES[fn])
    else:
        ops.foreach_prox_(*args)
    return weight


def group_shrink_(weight, lam, dim=None, *, size_weighted=True):
    fn = "group_shrink_"
    if _checks.is_dtensor(weight):
        return distributed.prox_(weight, lam_group=lam, dim=dim, size_weighted=size_weighted)
    dims = _checked(weight, dim, fn)
    _checks.check_flag(size_weighted, "size_weighted", fn)
    lam = _lam(lam, "lam", weight, fn)
    table = _fused.preset_table(weight, (0.0, lam, 0.0), fn, _LAM_NAMES[fn])
    return _step(weight, table, dims, size_weighted, True, fn)


def soft_threshold_(weight, lam):
    fn = "soft_threshold_"
    if _checks.is_dtensor(weight):
        return distributed.prox_(weight, lam_l1=lam, dim=None)
    dims = _checked(weight, _NO_GROUPS, fn)
    lam = _lam(lam, "lam", weight, fn)
    table = _fused.preset_table(weight, (lam, 0.0, 0.0), fn, _LAM_NAMES[fn])
    return _step(weight, table, dims, True, True, fn)


def sparse_group_shrink_(weight, lam_l1, lam_group, dim=None, *, size_weighted=True):
    fn = "sparse_group_shrink_"
    if _checks.is_dtensor(weight):
        return distributed.prox_(weight, lam_l1=lam_l1, lam_group=lam_group, dim=dim,
                                 size_weighted=size_weighted)
    dims = _checked(weight, dim, fn)
    _checks.check_flag(size_weighted, "size_weighted", fn)
    lam_l1 = _lam(lam_l1, "lam_l1", weight, fn)
    lam_group = _lam(lam_group, "lam_group", weight, fn)
    table = _fused.preset_table(weight, (lam_l1, lam_group, 0.0), fn, _LAM_NAMES[fn])
    return _step(weight, table, dims, size_weighted, True, fn)


def exclusive_shrink_(weight, lam, dim=None, *, exact=True):
    fn = "exclusive_shrink_"
    if _checks.is_dtensor(weight):
        return distributed.prox_(weight, lam_exclusive=lam, dim=dim, exact=exact)
    dims = _checked(weight, dim, fn)
    _checks.check_flag(exact, "exact", fn)
    lam = _lam(lam, "lam", weight, fn)
    table = _fused.preset_table(weight, (0.0, 0.0, lam), fn, _LAM_NAMES[fn])
    return _step(weight, table, dims, True, exact, fn)


def cges_shrink_(weight, lam_group, lam_exclusive, dim=None, *, size_weighted=True, exact=True):
    fn = "cges_shrink_"
    if _checks.is_dtensor(weight):
        return distributed.prox_(weight, lam_group=lam_group, lam_exclusive=lam_exclusive,
                                 dim=dim, size_weighted=size_weighted, exact=exact)
    dims = _checked(weight, dim, fn)
    _checks.check_flag(size_weighted, "size_weighted", fn)
    _checks.check_flag(exact, "exact", fn)
    lam_group = _lam(lam_group, "lam_group", weight, fn)
    lam_exclusive = _lam(lam_exclusive, "lam_exclusive", weight, fn)
    table = _fused.preset_table(weight, (0.0, lam_group, lam_exclusive), fn, _LAM_NAMES[fn])
    return _step(weight, table, dims, size_weighted, exact, fn)


for _fn in (group_norms, foreach_prox_, coupled_prox_, foreach_metric_prox_, group_shrink_,
            soft_threshold_, sparse_group_shrink_, exclusive_shrink_, cges_shrink_):
    _fn.__doc__ = BY_NAME[_fn.__name__].docstring
del _fn

__all__ = [op.name for op in BY_NAME.values()]
