"""Proximal steps in an Adam / AdamW step's metric (docs/SPEC.md, "Proximal steps in an
optimizer's metric").

After an Adam step, ``z`` (the updated weight) minimizes the step's quadratic model in the metric
``D = diag(d)``, ``d = (sqrt(v_hat) + eps) / lr``; the regularized step is

    x = argmin_x  1/2 (x - z)^T D (x - z) + Omega(x)

* ``foreach_metric_prox_``: one call for a list of tensors with their second moments (the fused
  op ``torch.ops.fastprox.foreach_metric_prox_``: C++ on the CPU, Triton on CUDA, the C++
  kernel on a host copy on other devices; DTensor weights: the local shards when no group spans
  shards, else the full tensor);
* ``coupled_metric_prox_`` / ``coupled_metric_step``: coupled groups (fastprox.coupled) in the
  metric (the fused op ``torch.ops.fastprox.coupled_metric_prox_``: per group, its slices
  gathered from the members into a buffer, solved by the plain step's per-group rules, written
  back; sets one after another in one call);
* ``AdamState``: what an Adam / AdamW optimizer's state says ``d`` is, per parameter.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _checks
from ._registry import ops
from .distributed import _local, _reduction_groups
from .operators import COLUMNS

_FN = "foreach_metric_prox_"


def _number(value, name: str, fn: str) -> float:
    """A Python float from a number or a 0-d tensor (read on the host)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be a real number or a 0-d tensor, got "
                             f"{value.dtype} of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number or a 0-d tensor, got "
                        f"{type(value).__name__}")
    return float(value)


def _numbers(values, name: str, fn: str) -> list:
    """Per-tensor values (numbers or 0-d tensors) as Python floats, the tensors read in one
    transfer per device (one host synchronisation, not one per tensor)."""
    return _read(values, (), name, fn)[0]


def _read(values, extra, name: str, fn: str) -> tuple[list, list]:
    """``_numbers`` of ``values``, and the float64 1-D tensors ``extra`` as lists of floats,
    read in the same transfer per device."""
    out = list(values)
    by_device: dict = {}
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor):
            if v.dim() != 0 or v.is_complex() or v.dtype == torch.bool:
                _number(v, f"{name}[{i}]", fn)  # raises, naming it
            by_device.setdefault(v.device, ([], []))[0].append(i)
    for e, t in enumerate(extra):
        by_device.setdefault(t.device, ([], []))[1].append(e)
    got: list = [None] * len(extra)
    for idx, eidx in by_device.values():
        parts = [out[i].double().reshape(1) for i in idx] + [extra[e] for e in eidx]
        flat = torch.cat(parts).tolist()
        for k, i in enumerate(idx):
            out[i] = flat[k]
        at = len(idx)
        for e in eidx:
            n = extra[e].numel()
            got[e] = flat[at:at + n]
            at += n
    return out, got


def metric_row(lr, eps, beta2, step, i: int | str, fn: str) -> tuple[float, float, float]:
    """(scale, eps, lr) of the op's metric table, d = (sqrt(v * scale) + eps) / lr, checked:
    lr >= 0, eps >= 0, 0 <= beta2 < 1, step >= 1 (None: no bias correction, scale 1). At
    lr = 0 (a warmup's first step) the metric is infinite and the step the identity: the
    callers skip that tensor."""
    lr = _number(lr, f"lr[{i}]", fn)
    eps = _number(eps, f"eps[{i}]", fn)
    beta2 = _number(beta2, f"beta2[{i}]", fn)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{fn}: lr[{i}] must be a finite number >= 0, got {lr}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps[{i}] must be a finite number >= 0, got {eps}")
    if not 0 <= beta2 < 1:
        raise ValueError(f"{fn}: beta2[{i}] must be in [0, 1), got {beta2}")
    if step is None:
        return 1.0, eps, lr
    step = _number(step, f"step[{i}]", fn)
    if not (math.isfinite(step) and step >= 1):
        raise ValueError(f"{fn}: step[{i}] must be a number >= 1 (the optimizer's step count), "
                         f"got {step}")
    return 1.0 / (1.0 - beta2 ** step), eps, lr


def foreach_metric_prox_(weights, exp_avg_sqs, *, lr, lam_l1=0.0, lam_group=0.0,
                         lam_exclusive=0.0, dim=None, size_weighted=True, exact=True, eps=1e-8,
                         beta2=0.999, step=None):
    fn = _FN
    for name, value in (("weights", weights), ("exp_avg_sqs", exp_avg_sqs)):
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{fn}: {name} must be a list or tuple of tensors, got "
                            f"{type(value).__name__}")
    count = len(weights)
    if len(exp_avg_sqs) != count:
        raise ValueError(f"{fn}: exp_avg_sqs has {len(exp_avg_sqs)} tensors for {count} weights")
    for i, (w, v) in enumerate(zip(weights, exp_avg_sqs)):
        _checks.check_weight(w, fn, f"weights[{i}]")
        _checks.check_grad(w, fn, f"weights[{i}]")
        _checks.check_writable(w, fn, f"weights[{i}]")
        _checks.check_weight(v, fn, f"exp_avg_sqs[{i}]")
        if v.shape != w.shape:
            raise ValueError(f"{fn}: exp_avg_sqs[{i}] has shape {tuple(v.shape)}, expected "
                             f"{tuple(w.shape)} (that of weights[{i}])")
        if _checks.is_dtensor(w) != _checks.is_dtensor(v):
            raise TypeError(f"{fn}: weights[{i}] and exp_avg_sqs[{i}] must both be DTensors or "
                            "both plain tensors")
        if v.device != w.device:
            raise ValueError(f"{fn}: exp_avg_sqs[{i}] is on {v.device} but weights[{i}] is on "
                             f"{w.device}")
    dims = _checks.per_tensor(dim, "dim", count, fn, _checks.is_dim_spec)
    dims = [_checks.normalize_dim(d, w, f"{fn}: weights[{i}]") for i, (d, w) in
            enumerate(zip(dims, weights))]
    columns = [[_number(v, f"{name}[{i}]", fn) for i, v in enumerate(_numbers(
                _checks.per_tensor(value, name, count, fn, _checks.is_threshold), name, fn))]
               for name, value in zip(COLUMNS, (lam_l1, lam_group, lam_exclusive))]
    for name, column in zip(COLUMNS, columns):
        for i, v in enumerate(column):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{fn}: {name}[{i}] must be a finite number >= 0, got {v}")
    flags = [_checks.per_tensor(value, name, count, fn, lambda v: isinstance(v, bool))
             for name, value in (("size_weighted", size_weighted), ("exact", exact))]
    steps = [None] * count if step is None else _numbers(_checks.per_tensor(
        step, "step", count, fn, _checks.is_threshold), "step", fn)
    rows = [metric_row(r, e, b, s, i, fn) for i, (r, e, b, s) in enumerate(zip(
        *(_numbers(_checks.per_tensor(value, name, count, fn, _checks.is_threshold), name, fn)
          for name, value in (("lr", lr), ("eps", eps), ("beta2", beta2))), steps))]
    lams = [tuple(c[i] for c in columns) for i in range(count)]
    plain, full = [], []
    for i, w in enumerate(weights):
        if lams[i] == (0.0, 0.0, 0.0) or w.numel() == 0 or rows[i][2] == 0:
            continue  # nothing to do: no threshold, no element, or lr = 0 (the identity)
        if _reduction_groups(w, dims[i], f"weights[{i}]", fn):
            full.append(i)
        else:
            plain.append(i)
    if not torch.compiler.is_compiling():  # (compiled: the op's kernel checks the same)
        _checks_disjoint([(i, weights[i]) for i in sorted(plain + full)],
                         [(i, exp_avg_sqs[i]) for i in sorted(plain + full)], fn)
    by_device: dict[torch.device, list[int]] = {}
    for i in plain:
        by_device.setdefault(_local(weights[i]).device, []).append(i)
    with torch.no_grad():  # (check_grad above: no weight that needs grad, in grad mode)
        for idx in by_device.values():
            _op([_local(weights[i]) for i in idx], [_local(exp_avg_sqs[i]) for i in idx],
                [lams[i] for i in idx], [rows[i] for i in idx], [dims[i] for i in idx],
                [flags[0][i] for i in idx], [flags[1][i] for i in idx], idx)
        for i in full:  # groups across shards: the step on the full tensor, each rank keeps its
            w = weights[i]  # part
            whole = w.full_tensor()
            _op([whole], [exp_avg_sqs[i].full_tensor()], [lams[i]], [rows[i]], [dims[i]],
                [flags[0][i]], [flags[1][i]], [i])
            _local(w).copy_(_reshard(whole, w))
    return weights


def _op(weights, moments, lams, rows, dims, size_weighted, exact, positions=None,
        names=None, moments_checked=False) -> None:
    """The fused op; the names its errors give the moments: ``names``, else ``exp_avg_sqs[i]``
    with ``positions`` each tensor's index in the caller's lists."""
    if names is None and positions is not None:
        names = [f"exp_avg_sqs[{i}]" for i in positions]
    ops.foreach_metric_prox_(
        list(weights), list(moments), torch.tensor(lams, dtype=torch.float64).reshape(-1, 3),
        torch.tensor(rows, dtype=torch.float64).reshape(-1, 3),
        [d for ds in dims for d in ds], [len(ds) for ds in dims], list(size_weighted),
        list(exact), names, moments_checked)


def _reshard(whole: torch.Tensor, like) -> torch.Tensor:
    """This rank's shard of a full tensor that every rank holds alike (no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(whole, like.device_mesh,
                                    [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


def _checks_disjoint(indexed, moments, fn: str) -> None:
    """Every weight is written in place: no two may overlap, and no second moment may share
    memory with a weight (checked on the local shards of DTensors; the ranges of
    fastprox.coupled)."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for i, w in indexed:
        local = _local(w)
        if local.numel() == 0:
            continue
        lo, hi = _checks.span(local)
        spans = by_storage.setdefault(local.untyped_storage().data_ptr(), [])
        for j, jlo, jhi in spans:
            if lo < jhi and jlo < hi:
                raise ValueError(f"{fn}: weights[{j}] and weights[{i}] share memory")
        spans.append((i, lo, hi))
    for i, v in moments:
        local = _local(v)
        if local.numel() == 0:
            continue
        lo, hi = _checks.span(local)
        for j, jlo, jhi in by_storage.get(local.untyped_storage().data_ptr(), []):
            if lo < jhi and jlo < hi:
                raise ValueError(f"{fn}: exp_avg_sqs[{i}] shares memory with weights[{j}], "
                                 "which the step writes; pass the optimizer's second moment "
                                 "(state['exp_avg_sq']), not a view of a weight")


# -- coupled groups ----------------------------------------------------------------------------

def _slice_table(groups) -> tuple[torch.Tensor, torch.Tensor]:
    """The set's groups as the op takes them, built once per set (they depend only on the
    members' indices, fixed when the set is built): ``slices``, int64 rows (member, position),
    group by group (members in order, each member's positions in position order), and
    ``starts``, where each group's rows begin (num_groups + 1 offsets); on the CPU."""
    cached = groups.__dict__.get("_slice_table")
    if cached is None:
        index = torch.cat([m.index for m in groups.slices])
        member = torch.cat([torch.full((len(m.index),), k, dtype=torch.int64)
                            for k, m in enumerate(groups.slices)])
        position = torch.cat([torch.arange(len(m.index)) for m in groups.slices])
        order = torch.sort(index, stable=True).indices
        counts = torch.bincount(index, minlength=groups.num_groups)
        cached = (torch.stack([member[order], position[order]], 1).contiguous(),
                  torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        groups.__dict__["_slice_table"] = cached
    return cached


def coupled_metric_step(sets, moments, rows, lams, size_weighted, exact, *, direct=False,
                        names=None) -> None:
    """The metric step of checked coupled sets, one after another in the order given, in one
    fused ``coupled_metric_prox_`` call (C++ on the CPU: per group, its slices gathered from the
    members into a buffer in cache, solved with the plain metric step's rules and written back;
    docs/SPEC.md). Per set: ``moments[j]``, per member, its second moment (``direct``: the
    metric d itself); ``rows[j]``, per member, (scale, eps, lr) (unused when ``direct``);
    ``lams[j]`` = (l1, lg, le): t_g = lg c_g, c_g = sqrt(n_g) when ``size_weighted[j]``;
    ``names``: per set, per member, what the op's errors call its moment."""
    by_device: dict = {}
    for j, g in enumerate(sets):  # (sets on different devices share no memory)
        by_device.setdefault(g.device, []).append(j)
    if len(by_device) > 1:
        for idx in by_device.values():
            coupled_metric_step(*([x[j] for j in idx] for x in (sets, moments, rows, lams,
                                                                size_weighted, exact)),
                                direct=direct, names=None if names is None else
                                [names[j] for j in idx])
        return
    members, flat_moments, axes, metric, sizes = [], [], [], [], []
    slices, starts, thresholds, labels = [], [], [], []
    for j, g in enumerate(sets):
        members += [m.tensor for m in g.slices]
        flat_moments += list(moments[j])
        axes += [m.axis for m in g.slices]
        metric += [(1.0, 0.0, 1.0)] * len(g.slices) if direct else list(rows[j])
        sizes.append(len(g.slices))
        table, begin = _slice_table(g)
        slices.append(table)
        starts.append(begin)
        c = g.sizes.to(torch.float64).sqrt() if size_weighted[j] else \
            torch.ones(g.num_groups, dtype=torch.float64)
        thresholds.append(float(lams[j][1]) * c)
        if names is not None:
            labels += list(names[j])
    ops.coupled_metric_prox_(
        members, flat_moments, axes, torch.tensor(metric, dtype=torch.float64).reshape(-1, 3),
        sizes, slices, starts, thresholds, [float(l[0]) for l in lams],
        [float(l[2]) for l in lams], [bool(e) for e in exact], direct,
        None if names is None else labels)


def coupled_metric_prox_(groups, ds, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0,
                         size_weighted=True, exact=True):
    """``coupled_prox_`` of one ``CoupledGroups`` in the metric ``diag(d)``: ``ds[k]`` (finite,
    >= 0, shaped like member k's tensor) is the metric of member k's elements. Per group, over
    the union of its slices: soft threshold by lam_l1/d_i, the metric group step with
    t_g = lam_group c_g (c_g = sqrt(n_g) or 1), the metric exclusive step (docs/SPEC.md), by the
    fused op (``coupled_metric_step``; float32 for float32 and 16-bit members, float64 for
    float64 members or where some d exceeds 1e18, whose square float32 cannot hold): every
    member read and written once. Returns ``groups``."""
    fn = "coupled_metric_prox_"
    l1, lg, le = (_number(v, n, fn) for v, n in ((lam_l1, "lam_l1"), (lam_group, "lam_group"),
                                                  (lam_exclusive, "lam_exclusive")))
    for name, v in zip(COLUMNS, (l1, lg, le)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v}")
    if not isinstance(size_weighted, bool) or not isinstance(exact, bool):
        raise TypeError(f"{fn}: size_weighted and exact must be bools")
    if len(ds) != len(groups.slices):
        raise ValueError(f"{fn}: ds has {len(ds)} tensors for {len(groups.slices)} members")
    for k, (m, d) in enumerate(zip(groups.slices, ds)):
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise TypeError(f"{fn}: ds[{k}] must be a floating-point tensor")
        if d.shape != m.tensor.shape:
            raise ValueError(f"{fn}: ds[{k}] has shape {tuple(d.shape)}, expected "
                             f"{tuple(m.tensor.shape)}")
        if d.device != m.tensor.device:
            raise ValueError(f"{fn}: ds[{k}] is on {d.device}, its member on "
                             f"{m.tensor.device}")
    for k, m in enumerate(groups.slices):
        _checks.check_grad(m.tensor, fn, f"member {k} ({m.name})")
    if (l1 == 0 and lg == 0 and le == 0) or groups.num_groups == 0:
        return groups
    names = [[f"ds[{k}], the metric of member {k} ({m.name}) of {groups.name},"
              for k, m in enumerate(groups.slices)]]
    with torch.no_grad():
        coupled_metric_step([groups], [[d.detach() for d in ds]], [None], [(l1, lg, le)],
                            [size_weighted], [exact], direct=True, names=names)
    return groups


# -- the optimizer's metric ----------------------------------------------------------------------

ADAMS = (torch.optim.Adam, torch.optim.AdamW)


class AdamState:
    """What an ``Adam`` / ``AdamW`` optimizer's state says of its parameters' metric, read once
    per step (the parameter groups indexed once, not searched per parameter): the Regularizer's
    sharded targets. Its plain targets and coupled sets read theirs through its plan
    (fastprox/metric_plan.py)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def metric(self, param) -> tuple | None:
        """(second moment, lr, eps, beta2, step) of the parameter's last step, as the step used
        them (``max_exp_avg_sq`` under amsgrad), or None when it has not been stepped yet."""
        state = self.optimizer.state.get(param)
        if not state or "exp_avg_sq" not in state:
            return None
        group = self.group_of[id(param)]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return v, group["lr"], group["eps"], group["betas"][1], state["step"]
