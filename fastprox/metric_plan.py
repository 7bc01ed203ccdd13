"""The plan of a Regularizer's coupled sets in an Adam / AdamW step's metric, built at the first
step, kept on the Regularizer, and checked at every step (``metric_step`` in fastprox/steps.py).

What a plan holds, fixed between steps: per set, its members and, per member, the optimizer's
parameter it lies in and the view of that parameter's second moment (``exp_avg_sq``, or
``max_exp_avg_sq`` under amsgrad) that lies where the member lies; the op's slice tables, each
set's ``c_g`` and the names the op's errors give its moments.

What it depends on, compared at every step (ids and a few ints per member and parameter: about
0.2 ms for ResNet-50's 37 sets): the sets, every member's layout
(``coupled_plan.layout_key``), the optimizer, its parameter groups and their parameters (and
amsgrad), and, per parameter, whether it has been stepped and its second moment's storage and
layout (a state loaded, a parameter stepped for the first time). Any of them changed: the plan
is rebuilt, never patched.

What changes every step and is read every step: the parameters' step counts and the groups'
lr, eps and beta2 (one transfer per device: a capturable or fused AdamW keeps its step counts
on the GPU), the sets' strengths (a SparsityTarget moves them). Each step is then one
``coupled_metric_prox_`` call per device, on lists the plan already holds.
"""

from __future__ import annotations

import torch

from . import _checks
from ._registry import ops
from .coupled_plan import layout_key
from .metric import _numbers, _slice_table, metric_row


def moment_of(optimizer, param, group):
    """The second moment the last Adam step of ``param`` (in parameter group ``group``) used:
    ``max_exp_avg_sq`` under amsgrad, else ``exp_avg_sq``; None when it has not been stepped
    yet."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    return state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]


def _optimizer_key(optimizer) -> tuple:
    return (id(optimizer),) + tuple(
        (id(g), bool(g.get("amsgrad")), tuple(map(id, g["params"])))
        for g in optimizer.param_groups)


def _moment_key(v) -> tuple | None:
    if v is None:
        return None
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(),
            v.dtype, v.device)


class CoupledMetricPlan:
    """The metric step of ``sets`` after ``optimizer``'s steps (see the module's docstring).
    Raises ValueError, naming the member, where a member is not (a view of) a parameter of the
    optimizer or its parameter's second moment is laid out unlike the parameter."""

    def __init__(self, sets, optimizer, fn: str):
        self.sets = list(sets)
        self.set_ids = tuple(map(id, self.sets))
        self.layout = layout_key(self.sets)
        self.optimizer_key = _optimizer_key(optimizer)
        groups = optimizer.param_groups
        by_storage = {p.untyped_storage().data_ptr(): p for g in groups for p in g["params"]
                      if not _checks.is_dtensor(p)}
        group_of = {id(p): j for j, g in enumerate(groups) for p in g["params"]}
        self.params: list = []          # every parameter a member lies in, once
        self.param_group: list[int] = []  # its parameter group's index
        where: dict[int, int] = {}
        self.members, self.views, self.axes, self.param_of = [], [], [], []
        self.ready: list[bool] = []     # every member's parameter stepped
        self.names, self.tables, self.c = [], [], []
        for g in self.sets:
            members, views, axes, param_of = [], [], [], []
            ready = True
            for k, m in enumerate(g.slices):
                p = by_storage.get(m.tensor.untyped_storage().data_ptr())
                if p is None:
                    raise ValueError(f"{fn}: member {k} ({m.name}) of {g.name} is not (a view "
                                     "of) a parameter of the optimizer")
                if id(p) not in where:
                    where[id(p)] = len(self.params)
                    self.params.append(p)
                    self.param_group.append(group_of[id(p)])
                v = moment_of(optimizer, p, groups[group_of[id(p)]])
                if v is None:
                    ready = False
                elif v.stride() != p.stride():
                    raise ValueError(f"{fn}: the second moment of {m.name} is laid out unlike "
                                     "the parameter; its view cannot be found")
                else:
                    views.append(v.as_strided(m.tensor.shape, m.tensor.stride(),
                                              v.storage_offset() + m.tensor.storage_offset()
                                              - p.storage_offset()))
                members.append(m.tensor)
                axes.append(m.axis)
                param_of.append(where[id(p)])
            self.members.append(members)
            self.views.append(views if ready else None)
            self.axes.append(axes)
            self.param_of.append(param_of)
            self.ready.append(ready)
            self.names.append([f"member {k} ({m.name}) of {g.name}: the second moment "
                               "(exp_avg_sq)" for k, m in enumerate(g.slices)])
            self.tables.append(_slice_table(g))
            self.c.append(g.sizes.to(torch.float64).sqrt())
        self.moments = self._moments(optimizer)
        self._thresholds: dict[int, tuple] = {}  # per set: (lam_group, size_weighted, t)

    def _moments(self, optimizer) -> tuple:
        groups = optimizer.param_groups
        return tuple(_moment_key(moment_of(optimizer, p, groups[j]))
                     for p, j in zip(self.params, self.param_group))

    def fits(self, sets, optimizer) -> bool:
        """Whether this plan is the plan of ``sets`` after ``optimizer``'s steps now."""
        return (tuple(map(id, sets)) == self.set_ids and layout_key(sets) == self.layout
                and _optimizer_key(optimizer) == self.optimizer_key
                and self._moments(optimizer) == self.moments)

    def _rows(self, optimizer, fn: str, tolerant: bool = False) -> list | None:
        """Per parameter, (scale, eps, lr) of its metric d = (sqrt(v scale) + eps) / lr (None
        for a parameter not stepped yet): its step count and its group's lr, eps and beta2,
        read in one transfer per device, checked once per distinct value. A value refused:
        None (``tolerant``: None for that parameter alone)."""
        groups = optimizer.param_groups
        state = optimizer.state
        stepped = [i for i, p in enumerate(self.params) if "step" in state.get(p, {})]
        values = _numbers([state[self.params[i]]["step"] for i in stepped] +
                          [v for g in groups for v in (g["lr"], g["eps"], g["betas"][1])],
                          "lr, eps, beta2 and step", fn)
        base = len(stepped)
        rows: list = [None] * len(self.params)
        seen: dict = {}
        for i, step in zip(stepped, values):
            j = self.param_group[i]
            key = (j, step)
            if key not in seen:
                try:
                    seen[key] = metric_row(*values[base + 3 * j:base + 3 * j + 3], step, i, fn)
                except (TypeError, ValueError):
                    if not tolerant:
                        return None
                    seen[key] = None
            rows[i] = seen[key]
        return rows

    def _refuse(self, optimizer, fn: str) -> None:
        """Raises the error of the first refused number as reading the sets member by member
        finds it (naming the member: ``lr[k]`` is member k's), if a member reads it."""
        state = optimizer.state
        for j in range(len(self.sets)):
            for k, i in enumerate(self.param_of[j]):
                p = self.params[i]
                if "step" not in state.get(p, {}):
                    break  # a member not stepped yet: the set is left out
                group = optimizer.param_groups[self.param_group[i]]
                metric_row(group["lr"], group["eps"], group["betas"][1], state[p]["step"], k,
                           fn)

    def check(self, lams, optimizer, fn: str) -> tuple[list, list[int]]:
        """Before anything is written: per parameter its metric row (``_rows``), and the sets
        the step takes: those whose members have all been stepped, whose strengths
        ``lams[j]`` = (l1, lg, le) are not all 0 and whose learning rate is not 0 (a set with
        members of lr 0 and others not: ValueError)."""
        rows = self._rows(optimizer, fn)
        if rows is None:  # a number refused: the error names the member that reads it
            self._refuse(optimizer, fn)
            rows = self._rows(optimizer, fn, tolerant=True)  # (read by no member)
        active = []
        for j, g in enumerate(self.sets):
            if not self.ready[j]:
                continue
            rates = [rows[i][2] for i in self.param_of[j]]
            if all(lr == 0 for lr in rates):
                continue
            if any(lr == 0 for lr in rates):
                raise ValueError(f"{fn}: the members of {g.name} have learning rates "
                                 f"{sorted(set(rates))}: some 0, some not; a coupled set's "
                                 "parameters need one learning rate (one parameter group)")
            active.append(j)
        return rows, [j for j in active if any(v > 0 for v in lams[j])]

    def run(self, checked: tuple[list, list[int]], lams, size_weighted, exact) -> None:
        """The step of the sets ``check`` took, one after another in the order of the plan, in
        one fused call per device (the op checks each moment before it writes anything)."""
        rows, active = checked
        by_device: dict = {}
        for j in active:  # (sets on different devices share no memory)
            by_device.setdefault(self.sets[j].device, []).append(j)
        for idx in by_device.values():
            self._call(idx, rows, lams, size_weighted, exact)

    def _threshold(self, j: int, lg: float, size_weighted: bool) -> torch.Tensor:
        cached = self._thresholds.get(j)
        if cached is None or cached[0] != lg or cached[1] != size_weighted:
            c = self.c[j] if size_weighted else torch.ones_like(self.c[j])
            cached = (lg, size_weighted, float(lg) * c)
            self._thresholds[j] = cached
        return cached[2]

    def _call(self, idx, rows, lams, size_weighted, exact) -> None:
        members, moments, axes, metric, names = [], [], [], [], []
        for j in idx:
            members += self.members[j]
            moments += self.views[j]
            axes += self.axes[j]
            metric += [rows[i] for i in self.param_of[j]]
            names += self.names[j]
        ops.coupled_metric_prox_(
            members, moments, axes, torch.tensor(metric, dtype=torch.float64).reshape(-1, 3),
            [len(self.members[j]) for j in idx], [self.tables[j][0] for j in idx],
            [self.tables[j][1] for j in idx],
            [self._threshold(j, lams[j][1], size_weighted[j]) for j in idx],
            [float(lams[j][0]) for j in idx], [float(lams[j][2]) for j in idx],
            [bool(exact[j]) for j in idx], False, names)


def coupled_metric_plan(reg, sets, optimizer, fn: str) -> CoupledMetricPlan:
    """The Regularizer's plan of ``sets`` after ``optimizer``'s steps: the one it holds when it
    still fits, else a new one (kept on the Regularizer)."""
    plan = getattr(reg, "_metric_plan", None)
    if plan is None or not plan.fits(sets, optimizer):
        plan = CoupledMetricPlan(sets, optimizer, fn)
        reg._metric_plan = plan
    return plan
