"""The plan of a Regularizer's Euclidean step (``euclidean_step`` in fastprox/steps.py):
thresholds ``lr * lam``, built at the first step, kept on the Regularizer, and checked at
every step.

What a plan holds, fixed between steps: per device, its plain targets (no DTensor) with
their parameters, checked once (a dense float tensor with no element shared within it) and
their reduced dimensions, flat as the op takes them; with an optimizer, the parameter group
of every target and of every coupled set (a set whose parameters lie in several groups
keeps them all: their learning rates must agree at every step).

What it depends on, compared at every step: the plain targets, their parameters' layouts
and their ``dim`` (``plan_keys.targets_key``), the coupled sets and their parameters, and the
optimizer with its parameter groups and their parameters (``plan_keys.optimizer_key``), or
none (a step given its ``lr``). Any of them changed: the plan is rebuilt, never patched.

What changes every step and is read every step: each group's ``lr`` (or the ``lr`` given),
the strengths (a SparsityTarget moves them), ``size_weighted`` and ``exact``. A step is then
one ``foreach_prox_`` call per device for the plain targets on lists the plan holds (the op
checks the weights against each other, in its kernel) and the coupled step of the sets
(fastprox/coupled.py, with plans of its own: fastprox/coupled_plan.py). Thresholds given as
numbers are checked here, naming the target; tensor ones (a tensor ``lr``) by the kernel.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _fused, coupled as _coupled, _rules
from ._registry import ops
from .operators import COLUMNS
from .plan_keys import optimizer_key, targets_key


def _check_lr(r, name: str, fn: str) -> None:
    """A learning rate given as a number: finite and >= 0 (a tensor one is checked with the
    thresholds it gives)."""
    if not isinstance(r, torch.Tensor) and not 0 <= r < math.inf:
        raise ValueError(f"{fn}: the lr of {name} must be a finite number >= 0, got {r}")


def _sets_key(sets) -> tuple:
    return tuple((id(t), tuple(map(id, t.params))) for t in sets)


class EuclideanPlan:
    """The Euclidean step of plain ``targets`` (presets.Target, no DTensor) and coupled
    ``sets`` (presets.CoupledTarget) after ``optimizer``'s steps, or with a given ``lr``
    (``optimizer`` None); see the module's docstring. Raises, naming the target, where a
    target's parameter is not a tensor the step can write, and where a target or set is not
    in ``optimizer``'s parameter groups."""

    def __init__(self, targets, sets, optimizer, fn: str, keyed: bool = True):
        self.targets = list(targets)
        self.sets = list(sets)
        if keyed:  # (not under torch.compile, which traces the plan's build at every call)
            self.targets_key = targets_key(self.targets)
            self.sets_key = _sets_key(self.sets)
            self.optimizer_key = None if optimizer is None else optimizer_key(optimizer)
        group_of = {} if optimizer is None else {
            id(p): j for j, g in enumerate(optimizer.param_groups) for p in g["params"]}
        if optimizer is not None:
            missing = [t.name for t in self.targets if id(t.param) not in group_of]
            missing += [t.name for t in self.sets if any(id(p) not in group_of
                                                         for p in t.params)]
            if missing:
                raise ValueError(f"Regularizer: {missing} are not parameters of the optimizer")
        self.buckets: list[tuple[list[int], list, list[int], list[int]]] = []
        by_device: dict = {}
        for k, t in enumerate(self.targets):
            _checks.check_weight(t.param, fn, t.name)
            _checks.check_writable(t.param, fn, t.name)
            by_device.setdefault(t.param.device, []).append(k)
        for idx in by_device.values():
            dims = [_checks.normalize_dim(self.targets[k].dim, self.targets[k].param,
                                          f"{fn}: {self.targets[k].name}") for k in idx]
            self.buckets.append((idx, [self.targets[k].param for k in idx],
                                 [d for ds in dims for d in ds], [len(ds) for ds in dims]))
        # per target and per set: the parameter groups whose lr it takes (None: the lr given)
        self.target_group = [group_of.get(id(t.param)) for t in self.targets]
        self.set_groups = [sorted({group_of[id(p)] for p in t.params}) if group_of else None
                           for t in self.sets]

    def fits(self, targets, sets, optimizer) -> bool:
        """Whether this plan is the plan of ``targets`` and ``sets`` with ``optimizer`` (or a
        given lr: None) now."""
        return (targets_key(targets) == self.targets_key and _sets_key(sets) == self.sets_key
                and (None if optimizer is None else optimizer_key(optimizer))
                == self.optimizer_key)

    def check(self, optimizer, lr, fn: str) -> tuple[list, list]:
        """Before anything is written: every threshold ``lr * lam`` given as a number checked
        (finite, >= 0; tensor ones are checked by the kernel) and one learning rate per coupled
        set. Returns the fused calls of the plain targets and the sets' thresholds."""
        groups = None if optimizer is None else optimizer.param_groups

        def rate(j, name, weight):  # (a 0-d CPU tensor read on the host: _fused.host_number)
            return _fused.host_number(lr if j is None else groups[j]["lr"], f"the lr of {name}",
                                      weight, fn)

        coupled_lams = []
        for t, js in zip(self.sets, self.set_groups):
            weight = t.params[0] if t.params else None  # (read for a tensor lr's device)
            if js is None:
                r = rate(None, t.name, weight)
            else:
                values = [rate(j, t.name, weight) for j in js]
                if any(v is not values[0] and v != values[0] for v in values[1:]):
                    raise ValueError(f"{fn}: the parameters of {t.name} are in parameter groups "
                                     "with different learning rates; a coupled group needs one")
                r = values[0]
            _check_lr(r, t.name, fn)
            coupled_lams.append(tuple(
                _coupled._threshold(r * lam, f"lr * {name} of {t.name}", fn)
                for name, lam in zip(COLUMNS, (t.lam_l1, t.lam_group, t.lam_exclusive))))
        calls = []
        for idx, params, dims, counts in self.buckets:
            ts = [self.targets[k] for k in idx]
            rates = [rate(self.target_group[k], t.name, t.param)
                     for k, t in zip(idx, ts)]
            for r, t in zip(rates, ts):
                _check_lr(r, t.name, fn)
            cells = [r * lam for r, t in zip(rates, ts)
                     for lam in (t.lam_l1, t.lam_group, t.lam_exclusive)]
            if all(type(v) is float or type(v) is int for v in cells):
                for i, v in enumerate(cells):
                    if not 0 <= v < math.inf:
                        t = ts[i // 3]
                        raise ValueError(f"{fn}: lr * {COLUMNS[i % 3]} of {t.name} must be a "
                                         f"finite number >= 0, got {v}")
                table = _fused.numbers_table(cells)
            else:  # a tensor lr: checked by the kernel before it writes anything
                table = _fused.lam_table(params, [cells[c::3] for c in range(3)],
                                         "foreach_prox_", COLUMNS)
            calls.append((params, table, dims, counts, [bool(t.size_weighted) for t in ts],
                          [bool(t.exact) for t in ts]))
        return calls, coupled_lams

    def run(self, checked) -> None:
        """The step ``check`` prepared: the plain targets' fused calls, one per device, then
        the sets' coupled step."""
        calls, coupled_lams = checked
        for call in calls:
            ops.foreach_prox_(*call)
        # every coupled set in one go: sets that share no tensor run together (coupled.waves)
        _coupled.step_sets([t.groups for t in self.sets], coupled_lams,
                           [t.size_weighted for t in self.sets], [t.exact for t in self.sets],
                           max_newton_steps=_rules.MAX_NEWTON_STEPS)


def euclidean_plan(reg, targets, sets, optimizer, fn: str) -> EuclideanPlan:
    """The Regularizer's plan of ``targets`` and ``sets`` with ``optimizer`` (None: a given
    lr): the one it holds when it still fits, else a new one (kept on the Regularizer)."""
    if torch.compiler.is_compiling():  # traced: the checks cost nothing at run time
        return EuclideanPlan(targets, sets, optimizer, fn, keyed=False)
    plan = getattr(reg, "_euclidean_plan", None)
    if plan is None or not plan.fits(targets, sets, optimizer):
        plan = EuclideanPlan(targets, sets, optimizer, fn)
        reg._euclidean_plan = plan
    return plan
