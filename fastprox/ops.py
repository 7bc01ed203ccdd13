"""The public operators, generated from the operator table (fastprox/operators.py).

``group_norms`` and ``foreach_prox_`` call the two ops of the library (``torch.ops.fastprox``);
every in-place operator (``group_shrink_``, ``soft_threshold_``, ...) is a preset of the fused
step ``foreach_prox_`` on one tensor: its function is written out from its row (signature,
docstring, argument checks, the thresholds it sets). DTensor weights go to
fastprox/distributed.py. The math contract is docs/SPEC.md.
"""

from __future__ import annotations

import torch

from . import _checks, _fused, distributed
from ._registry import ops
from .operators import BY_NAME, COLUMNS, PRESETS, Operator


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


def _preset_step(op: Operator, weight, lams, dim, flags: dict):
    """A preset of the fused step on one tensor: checks in the operator's own names, then its
    thresholds into their columns (0 elsewhere)."""
    fn = op.name
    _checks.check_weight(weight, fn)
    _checks.check_grad(weight, fn)
    dims = _checks.normalize_dim(dim, weight, fn) if op.grouped else []
    for name, value in flags.items():
        _checks.check_flag(value, name, fn)
    for name, value in zip(op.threshold_names, lams):
        if isinstance(value, torch.Tensor):
            _checks.as_threshold(value, name, weight, fn)
        else:
            _checks.check_number(value, name, fn)
    given = op.columns(lams)
    columns = [[given.get(c, 0.0)] for c in COLUMNS]
    _fused.prox_([weight], columns, [dims], [flags.get("size_weighted", True)],
                 [flags.get("exact", True)], fn, op.lam_names())
    return weight


def _preset_sharded(op: Operator, weight, lams, dim, flags: dict):
    return distributed.prox_(weight, **op.columns(lams), dim=dim, **flags)


def _write_preset(op: Operator):
    """The function of a preset row, with its real signature (as dataclasses writes methods):
    ``name(weight, <thresholds>[, dim=None][, *, <flags>=True])``."""
    lams = ", ".join(op.threshold_names)
    params = ["weight", *op.threshold_names] + (["dim=None"] if op.grouped else [])
    if op.flags:
        params += ["*", *(f"{f}=True" for f in op.flags)]
    dim = "dim" if op.grouped else "None"
    flags = "{" + ", ".join(f"{f!r}: {f}" for f in op.flags) + "}"
    source = (f"def {op.name}({', '.join(params)}):\n"
              f"    if is_dtensor(weight):\n"
              f"        return sharded(OP, weight, ({lams},), {dim}, {flags})\n"
              f"    return step(OP, weight, ({lams},), {dim}, {flags})\n")
    scope = dict(OP=op, is_dtensor=_checks.is_dtensor, sharded=_preset_sharded,
                 step=_preset_step)
    exec(source, scope)  # noqa: S102  (source built from the table above, no user input)
    fn = scope[op.name]
    fn.__module__ = __name__
    fn.__qualname__ = op.name
    return fn


for _op in PRESETS:
    globals()[_op.name] = _write_preset(_op)
for _fn in (group_norms, foreach_prox_, *(globals()[_op.name] for _op in PRESETS)):
    _fn.__doc__ = BY_NAME[_fn.__name__].docstring
del _op, _fn

__all__ = [op.name for op in BY_NAME.values()]
