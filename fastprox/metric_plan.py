"""The plan of a Regularizer's metric step after an Adam / AdamW step (``metric_step`` in
fastprox/steps.py): its plain targets and its coupled sets, built at the first step, kept on
the Regularizer, and checked at every step.

What a plan holds, fixed between steps: every parameter a target or a member lies in, once,
with its parameter group; per plain target, its second moment (``exp_avg_sq``, or
``max_exp_avg_sq`` under amsgrad), its reduced dimensions and the name the op's errors give it,
all checked once (a dense float tensor, its moment alike, nothing shared); per coupled set, its
members, each member's parameter and the view of that parameter's second moment that lies where
the member lies, the op's slice tables, each set's ``c_g`` and the names the op's errors give
its moments.

What it depends on, compared at every step (ids and a few ints per tensor: about 0.2 ms for
ResNet-50's 37 sets): the plain targets, their parameters' layouts and dimensions, the sets,
every member's layout (``plan_keys.layout_key``), the optimizer, its parameter groups and
their parameters (and amsgrad), and, per parameter, whether it has been stepped and its second
moment's storage and layout (a state loaded, a parameter stepped for the first time). Any of
them changed: the plan is rebuilt, never patched.

What changes every step and is read every step: the parameters' step counts and the groups'
lr, eps and beta2 (one transfer per device: a capturable or fused AdamW keeps its step counts
on the GPU) with, in the same transfer, the bounds of every second moment the step reads
(finite and >= 0 is checked here, so that the ops check only where the moments lie: one host
synchronisation a step on a GPU), the strengths (a SparsityTarget moves them),
``size_weighted`` and ``exact``.
Each step is then one ``foreach_metric_prox_`` call per device for the plain targets and one
``coupled_metric_prox_`` call per device for the sets, on lists the plan already holds.
Sharded targets (DTensors) are not planned: ``metric_step`` passes them to
``fastprox.metric.foreach_metric_prox_``.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from ._registry import ops
from .plan_keys import layout_key, optimizer_key, targets_key, tensor_key
from .metric import _checks_disjoint, _number, _op, _read, _slice_table, metric_row
from .operators import COLUMNS


def moment_of(optimizer, param, group):
    """The second moment the last Adam step of ``param`` (in parameter group ``group``) used:
    ``max_exp_avg_sq`` under amsgrad, else ``exp_avg_sq``; None when it has not been stepped
    yet."""
    state = optimizer.state.get(param)
    if not state or "exp_avg_sq" not in state:
        return None
    return state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]


def _moment_key(v) -> tuple | None:
    return None if v is None else tensor_key(v)


class MetricPlan:
    """The metric step of plain ``targets`` (presets.Target, no DTensor) and coupled ``sets``
    after ``optimizer``'s steps (see the module's docstring). Raises, naming the target or the
    member, where a target's parameter or its second moment is not a tensor the step can take,
    a member is not (a view of) a parameter of the optimizer, or its parameter's second moment
    is laid out unlike the parameter."""

    def __init__(self, targets, sets, optimizer, fn: str):
        self.targets = list(targets)
        self.targets_key = targets_key(self.targets)
        self.sets = list(sets)
        self.set_ids = tuple(map(id, self.sets))
        self.layout = layout_key(self.sets)
        self.optimizer_key = optimizer_key(optimizer)
        groups = optimizer.param_groups
        by_storage = {p.untyped_storage().data_ptr(): p for g in groups for p in g["params"]
                      if not _checks.is_dtensor(p)}
        group_of = {id(p): j for j, g in enumerate(groups) for p in g["params"]}
        self.params: list = []          # every parameter a target or member lies in, once
        self.param_group: list[int] = []  # its parameter group's index
        where: dict[int, int] = {}

        def index(p) -> int:
            if id(p) not in where:
                where[id(p)] = len(self.params)
                self.params.append(p)
                self.param_group.append(group_of[id(p)])
            return where[id(p)]

        self.target_param, self.target_moment, self.target_dims, self.target_names = \
            [], [], [], []
        for t in self.targets:
            p = t.param
            _checks.check_weight(p, fn, t.name)
            _checks.check_writable(p, fn, t.name)
            i = index(p)
            v = moment_of(optimizer, p, groups[self.param_group[i]])
            name = f"{t.name}: the second moment (exp_avg_sq)"
            if v is not None:
                _checks.check_weight(v, fn, name)
                if v.shape != p.shape or v.device != p.device:
                    raise ValueError(f"{fn}: {name} has shape {tuple(v.shape)} on {v.device}, "
                                     f"expected {tuple(p.shape)} on {p.device}")
            self.target_param.append(i)
            self.target_moment.append(v)
            self.target_dims.append(_checks.normalize_dim(t.dim, p, f"{fn}: {t.name}"))
            self.target_names.append(name)
        stepped = [k for k, v in enumerate(self.target_moment) if v is not None]
        _checks_disjoint([(k, self.targets[k].param) for k in stepped],
                         [(k, self.target_moment[k]) for k in stepped], fn)

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
                i = index(p)
                v = moment_of(optimizer, p, groups[self.param_group[i]])
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
                param_of.append(i)
            self.members.append(members)
            self.views.append(views if ready else None)
            self.axes.append(axes)
            self.param_of.append(param_of)
            self.ready.append(ready)
            self.names.append([f"member {k} ({m.name}) of {g.name}: the second moment "
                               "(exp_avg_sq)" for k, m in enumerate(g.slices)])
            self.tables.append(_slice_table(g))
            self.c.append(g.sizes.to(torch.float64).sqrt())
        # the moments a step checks (finite, >= 0), each view once: per target and per member
        # of a set, its index in that list (None: nothing to check)
        self.checks: list = []
        self.check_names: list[str] = []
        seen: dict = {}

        def check_index(v, name):
            if v is None or v.numel() == 0:
                return None
            key = tensor_key(v)
            if key not in seen:
                seen[key] = len(self.checks)
                self.checks.append(v)
                self.check_names.append(name)
            return seen[key]

        self.target_check = [check_index(v, name) for v, name in
                             zip(self.target_moment, self.target_names)]
        self.set_check = [None if views is None else
                          [check_index(v, name) for v, name in zip(views, names)]
                          for views, names in zip(self.views, self.names)]
        self.moments = self._moments(optimizer)
        self._thresholds: dict[int, tuple] = {}  # per set: (lam_group, size_weighted, t)

    def _moments(self, optimizer) -> tuple:
        groups = optimizer.param_groups
        return tuple(_moment_key(moment_of(optimizer, p, groups[j]))
                     for p, j in zip(self.params, self.param_group))

    def fits(self, targets, sets, optimizer) -> bool:
        """Whether this plan is the plan of ``targets`` and ``sets`` after ``optimizer``'s steps
        now."""
        return (tuple(map(id, sets)) == self.set_ids and targets_key(targets) == self.targets_key
                and layout_key(sets) == self.layout
                and optimizer_key(optimizer) == self.optimizer_key
                and self._moments(optimizer) == self.moments)

    def _rows(self, optimizer, fn: str, tolerant: bool = False, extra=()) -> tuple:
        """Per parameter, (scale, eps, lr) of its metric d = (sqrt(v scale) + eps) / lr (None
        for a parameter not stepped yet): its step count and its group's lr, eps and beta2,
        read in one transfer per device (with the float64 1-D tensors ``extra``, returned as
        lists), checked once per distinct value. A value refused: None (``tolerant``: None for
        that parameter alone)."""
        groups = optimizer.param_groups
        state = optimizer.state
        stepped = [i for i, p in enumerate(self.params) if "step" in state.get(p, {})]
        values, read = _read([state[self.params[i]]["step"] for i in stepped] +
                             [v for g in groups for v in (g["lr"], g["eps"], g["betas"][1])],
                             extra, "lr, eps, beta2 and step", fn)
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
                        return None, read
                    seen[key] = None
            rows[i] = seen[key]
        return rows, read

    def _refuse(self, optimizer, fn: str) -> None:
        """Raises the error of the first refused number as reading the sets member by member,
        then the plain targets, finds it (naming the member: ``lr[k]`` is member k's; the
        target: ``lr['name']``), if one reads it."""
        state = optimizer.state

        def read(i, label):
            group = optimizer.param_groups[self.param_group[i]]
            metric_row(group["lr"], group["eps"], group["betas"][1],
                       state[self.params[i]]["step"], label, fn)

        for j in range(len(self.sets)):
            for k, i in enumerate(self.param_of[j]):
                if "step" not in state.get(self.params[i], {}):
                    break  # a member not stepped yet: the set is left out
                read(i, k)
        for t, i in zip(self.targets, self.target_param):
            if "step" in state.get(self.params[i], {}):
                read(i, repr(t.name))

    def _maybe(self, lams) -> list[int]:
        """The moments (indices into ``checks``) the step may read: those of the stepped
        targets and sets whose strengths are not all 0."""
        def some(values):
            return any(not (isinstance(v, (int, float)) and v == 0) for v in values)

        out = {c for t, c in zip(self.targets, self.target_check) if c is not None
               and some((t.lam_l1, t.lam_group, t.lam_exclusive))}
        for j, cs in enumerate(self.set_check):
            if cs is not None and some(lams[j]):
                out.update(c for c in cs if c is not None)
        return sorted(out)

    def check(self, lams, optimizer, fn: str) -> tuple[list, list[tuple], list[int]]:
        """Before anything is written: per parameter its metric row (``_rows``); the plain
        targets the step takes, with their strengths (stepped, with elements, strengths
        finite, >= 0 and not all 0, lr not 0); the sets it takes: those whose members have all
        been stepped, whose strengths ``lams[j]`` = (l1, lg, le) are not all 0 and whose
        learning rate is not 0 (a set with members of lr 0 and others not: ValueError); every
        second moment they read finite and >= 0 (its bounds read with the numbers, in one
        transfer per device: the step's one host synchronisation on a GPU)."""
        maybe = self._maybe(lams)
        rows, bounds = self._rows(optimizer, fn, extra=[
            torch.stack(torch.aminmax(self.checks[c])).double() for c in maybe])
        if rows is None:  # a number refused: the error names the member or target that reads it
            self._refuse(optimizer, fn)
            rows, _ = self._rows(optimizer, fn, tolerant=True)  # (read by no member or target)
        plain = []
        for k, t in enumerate(self.targets):
            row = rows[self.target_param[k]]
            if row is None or self.target_moment[k] is None:
                continue  # not stepped yet: left as it is
            strengths = tuple(_number(v, f"{t.name}: {name}", fn) for name, v in
                              zip(COLUMNS, (t.lam_l1, t.lam_group, t.lam_exclusive)))
            for name, v in zip(COLUMNS, strengths):
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"{fn}: {t.name}: {name} must be a finite number >= 0, "
                                     f"got {v}")
            if any(v > 0 for v in strengths) and t.param.numel() > 0 and row[2] != 0:
                plain.append((k, strengths))
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
        active = [j for j in active if any(v > 0 for v in lams[j])]
        bound_of = dict(zip(maybe, bounds))
        for c in [self.target_check[k] for k, _ in plain] + \
                [c for j in active for c in self.set_check[j] if c is not None]:
            lo, hi = bound_of[c]
            if not (lo >= 0 and hi < math.inf):
                raise ValueError(f"{fn}: {self.check_names[c]} has negative, NaN or infinite "
                                 "entries (a second moment is finite and >= 0); the "
                                 "optimizer's state is damaged: check the loss and gradients "
                                 "for NaN/inf, or reload a checkpoint")
        return rows, plain, active

    def run_plain(self, checked) -> None:
        """The step of the plain targets ``check`` took, in one fused call per device (their
        moments' values checked by ``check``; the op checks where they lie)."""
        rows, plain, _ = checked
        by_device: dict = {}
        for k, strengths in plain:
            by_device.setdefault(self.targets[k].param.device, []).append((k, strengths))
        with torch.no_grad():
            for pairs in by_device.values():
                idx = [k for k, _ in pairs]
                ts = [self.targets[k] for k in idx]
                _op([t.param for t in ts], [self.target_moment[k] for k in idx],
                    [strengths for _, strengths in pairs],
                    [rows[self.target_param[k]] for k in idx],
                    [self.target_dims[k] for k in idx], [bool(t.size_weighted) for t in ts],
                    [bool(t.exact) for t in ts], names=[self.target_names[k] for k in idx],
                    moments_checked=True)

    def run(self, checked, lams, size_weighted, exact) -> None:
        """The step of the sets ``check`` took, one after another in the order of the plan, in
        one fused call per device (their moments' values checked by ``check``; the op checks
        where they lie)."""
        rows, _, active = checked
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
            [bool(exact[j]) for j in idx], False, names, True)


def metric_plan(reg, targets, sets, optimizer, fn: str) -> MetricPlan:
    """The Regularizer's plan of ``targets`` and ``sets`` after ``optimizer``'s steps: the one
    it holds when it still fits, else a new one (kept on the Regularizer)."""
    plan = getattr(reg, "_metric_plan", None)
    if plan is None or not plan.fits(targets, sets, optimizer):
        plan = MetricPlan(targets, sets, optimizer, fn)
        reg._metric_plan = plan
    return plan
