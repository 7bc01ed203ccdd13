"""The public operators, generated from the operator table (fastprox/operators.py).

``group_norms`` and ``foreach_prox_`` call the two ops of the library (``torch.ops.fastprox``);
every in-place operator (``group_shrink_``, ``soft_threshold_``, ...) is a preset of the fused
step ``foreach_prox_`` on one tensor: its function is written out from its row (signature,
docstring, argument checks, the thresholds it sets). DTensor weights go to
fastprox/distributed.py. The math contract is docs/SPEC.md.
"""

from __future__ import annotations

import linecache

import torch

from . import _checks, _fused, distributed
from .coupled import coupled_prox_
from .metric import foreach_metric_prox_
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


def _preset_sharded(op: Operator, weight, lams, dim, flags: dict):
    return distributed.prox_(weight, **op.columns(lams), dim=dim, **flags)


def _write_preset(op: Operator):
    """The function of a preset row, written out with its real signature (as dataclasses writes
    methods): ``name(weight, <thresholds>[, dim=None][, *, <flags>=True])``: checks in the
    operator's own names, then the fused step on ``[weight]`` with the row's thresholds in
    their columns (0 in the others)."""
    lams = op.threshold_names
    params = ["weight", *lams] + (["dim=None"] if op.grouped else [])
    if op.flags:
        params += ["*", *(f"{f}=True" for f in op.flags)]
    dim = "dim" if op.grouped else "None"
    cells = ", ".join(op.columns(lams).get(c, "0.0") for c in COLUMNS)
    lines = [
        f"def {op.name}({', '.join(params)}):",
        "    if is_dtensor(weight):",
        f"        return sharded(OP, weight, ({', '.join(lams)},), {dim}, "
        "{" + ", ".join(f"{f!r}: {f}" for f in op.flags) + "})",
        "    check_weight(weight, NAME)",
        "    check_grad(weight, NAME)",
        "    check_writable(weight, NAME)",
        "    dims = normalize_dim(dim, weight, NAME)" if op.grouped else "    dims = []",
        *(f"    check_flag({f}, {f!r}, NAME)" for f in op.flags),
        *(f"    if type({lam}) is not float:\n"
          f"        {lam} = host_number({lam}, {lam!r}, weight, NAME)" for lam in lams),
        f"    table, named = preset_table(weight, ({cells},), NAME, LAM_NAMES)",
        f"    args = ([weight], table, dims, [len(dims)], "
        f"[{'size_weighted' if 'size_weighted' in op.flags else 'True'}], "
        f"[{'exact' if 'exact' in op.flags else 'True'}])",
        "    if named:",
        "        fused(*args, NAME, LAM_NAMES)",
        "    else:",
        "        fused(*args)",
        "    return weight",
    ]
    scope = dict(OP=op, NAME=op.name, LAM_NAMES=op.lam_names(), is_dtensor=_checks.is_dtensor,
                 sharded=_preset_sharded, check_weight=_checks.check_weight,
                 check_grad=_checks.check_grad, check_writable=_checks.check_writable,
                 normalize_dim=_checks.normalize_dim,
                 check_flag=_checks.check_flag,
                 preset_table=_fused.preset_table, host_number=_fused.host_number,
                 fused=_fused_op)
    source = "\n".join(lines) + "\n"
    # a file name that tracebacks and inspect.getsource() can show (the source is kept in
    # linecache, as dataclasses' generated methods are not)
    filename = f"<fastprox.ops: preset {op.name}, generated from its row in operators.py>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), scope)  # noqa: S102  (built from the table above)
    fn = scope[op.name]
    fn.__module__ = __name__
    fn.__qualname__ = op.name
    return fn


def _fused_op(*args):
    ops.foreach_prox_(*args)


for _op in PRESETS:
    globals()[_op.name] = _write_preset(_op)
for _fn in (group_norms, foreach_prox_, coupled_prox_, foreach_metric_prox_,
            *(globals()[_op.name] for _op in PRESETS)):
    _fn.__doc__ = BY_NAME[_fn.__name__].docstring
del _op, _fn

__all__ = [op.name for op in BY_NAME.values()]
