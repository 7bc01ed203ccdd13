"""The proximal step of a Regularizer after an optimizer step (``Regularizer.prox_step``).

* ``euclidean_step``: thresholds ``lr * lam`` (``lr`` of each parameter's group, or the one
  given), through the Regularizer's plan (fastprox/euclidean_plan.py): plain targets in one
  ``foreach_prox_`` call per device (sharded ones in one of their own), coupled sets through
  the phases (fastprox/coupled.py, sets that share no tensor together);
* ``metric_step``: the step in an Adam / AdamW step's metric, read from the optimizer's state
  through the Regularizer's plan (fastprox/metric_plan.py): plain targets in one
  ``foreach_metric_prox_`` call per device, coupled sets one after another in one
  ``coupled_metric_prox_`` call per device; sharded targets through
  ``fastprox.metric.foreach_metric_prox_``.

Each checks everything (learning rates, thresholds, metrics) before anything is written.
``take`` runs one of them, with a target's controller around it (and, under torch.compile, the
parts that read values on the host outside the graph, in one region).
"""

from __future__ import annotations

import torch

from . import coupled as _coupled, euclidean_plan as _euclidean_plan, metric as _metric
from . import metric_plan as _metric_plan
from . import ops
from ._compiled import outside_graph as _outside_graph
from ._checks import is_dtensor

PROX_MODES = ("auto", "metric", "euclidean")


def prox_of(optimizer, prox: str, fn: str) -> str:
    """The step ``prox`` asks for with this optimizer: "metric" or "euclidean"."""
    if prox not in PROX_MODES:
        raise ValueError(f"{fn}: prox must be one of {PROX_MODES}, got {prox!r}")
    adam = isinstance(optimizer, _metric.ADAMS)
    if prox == "metric" and not adam:
        raise ValueError(f"{fn}: prox='metric' needs torch.optim.Adam or AdamW (the "
                         f"metric is their second moment), got {type(optimizer).__name__}")
    if prox == "auto":
        if adam:
            return "metric"
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"{fn}: no exact proximal step is known for {type(optimizer).__name__}'s "
                "steps (fastprox takes Adam and AdamW in their metric, SGD in the Euclidean "
                "one); pass prox='euclidean' for the Euclidean step with thresholds "
                "lr * lam (a heuristic for this optimizer)")
        return "euclidean"
    return prox


def lr_of(reg, optimizer) -> dict[int, object]:
    """Per parameter (by id) its group's learning rate; every target must be a parameter of
    the optimizer."""
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    missing = [t.name for t in reg.targets.values() if id(t.param) not in lrs]
    missing += [t.name for t in reg.coupled.values()
                if any(id(p) not in lrs for p in t.params)]
    if missing:
        raise ValueError(f"Regularizer: {missing} are not parameters of the optimizer")
    return lrs


def take(reg, optimizer, lr, metric: bool) -> None:
    """One proximal step of ``reg`` (its target's controller around it, when it has one): the
    metric step when ``metric``, else the Euclidean one. Under torch.compile, the Euclidean
    step is traced (no graph break): plain targets, and coupled sets whose plans an eager step
    built, with learning rates that are numbers (``_coupled_traceable``). The metric step, a
    controller and the other coupled steps work on the host (the optimizer's step counts read,
    plans built from where their tensors lie, group norms ranked), which would break the graph
    at each read and recompile for each tensor: they run outside it, in one region, one
    break."""
    if torch.compiler.is_compiling() and (metric or reg.controller is not None
                                          or not _coupled_traceable(reg, optimizer, lr)):
        _take_outside_graph(reg, optimizer, lr, metric)
    else:
        _take(reg, optimizer, lr, metric)


def _coupled_traceable(reg, optimizer, lr) -> bool:
    """Whether the Euclidean step of ``reg``'s coupled sets can be traced: learning rates that
    are numbers (a tensor one would be read on the host: ``coupled._threshold``) and every
    plan the step takes built by an eager step (``coupled.traceable``)."""
    sets = list(reg.coupled.values())
    if not sets:
        return True
    if optimizer is None:
        rates = [lr]
    else:
        mine = {id(p) for t in sets for p in t.params}
        rates = [g["lr"] for g in optimizer.param_groups
                 if any(id(p) in mine for p in g["params"])]
    if any(isinstance(r, torch.Tensor) for r in rates):
        return False
    return _coupled.traceable([t.groups for t in sets],
                              [(t.lam_l1, t.lam_group, t.lam_exclusive) for t in sets],
                              [t.size_weighted for t in sets], [t.exact for t in sets])


def _take(reg, optimizer, lr, metric: bool) -> None:
    if reg.controller is not None:
        reg.controller.before_step()
    if metric:
        metric_step(reg, optimizer)
    else:
        euclidean_step(reg, optimizer, lr)
    reg.steps += 1
    if reg.controller is not None:
        reg.controller.after_step()


# called only under torch.compile: the graph breaks once, here, and the step runs eagerly
_take_outside_graph = _outside_graph(_take)


def euclidean_step(reg, optimizer, lr) -> None:
    """Every target's Euclidean step, thresholds ``lr * lam`` (``lr`` from ``optimizer``'s
    parameter groups, or the ``lr`` given when ``optimizer`` is None), from the Regularizer's
    plan (fastprox/euclidean_plan.py): plain targets in one ``foreach_prox_`` call per device,
    coupled sets through the phases (fastprox/coupled.py); sharded targets (DTensors) in a
    ``foreach_prox_`` call of their own."""
    fn = "Regularizer.prox_step"
    plain, sharded = [], []
    for t in reg.targets.values():
        (sharded if is_dtensor(t.param) else plain).append(t)
    if sharded and optimizer is not None:
        lrs = lr_of(reg, optimizer)
    # every check before anything is written: the plan's (its tensors checked when it is built;
    # every step, the thresholds), then the sharded targets' call's
    plan = _euclidean_plan.euclidean_plan(reg, plain, list(reg.coupled.values()), optimizer, fn)
    checked = plan.check(optimizer, lr, fn)
    if sharded:
        rates = [lrs[id(t.param)] if optimizer is not None else lr for t in sharded]
        ops.foreach_prox_([t.param for t in sharded],
                          lam_l1=[r * t.lam_l1 for r, t in zip(rates, sharded)],
                          lam_group=[r * t.lam_group for r, t in zip(rates, sharded)],
                          lam_exclusive=[r * t.lam_exclusive for r, t in zip(rates, sharded)],
                          dim=[t.dim for t in sharded],
                          size_weighted=[t.size_weighted for t in sharded],
                          exact=[t.exact for t in sharded])
    plan.run(checked)


def metric_step(reg, optimizer) -> None:
    """Every target in the Adam / AdamW step's metric, from the Regularizer's plan
    (fastprox/metric_plan.py): plain targets in one ``foreach_metric_prox_`` call per device,
    coupled sets one after another in one fused call per device; sharded targets (DTensors) in
    a ``foreach_metric_prox_`` call of their own. A parameter the optimizer has not stepped yet
    is left as it is."""
    lr_of(reg, optimizer)
    fn = "Regularizer.prox_step"
    plain, sharded = [], []
    for t in reg.targets.values():
        (sharded if is_dtensor(t.param) else plain).append(t)
    coupled = list(reg.coupled.values())
    # every check before anything is written: the plan's (its tensors checked when it is built;
    # every step, the metrics and strengths), then the sharded targets' call's
    plan = _metric_plan.metric_plan(reg, plain, [t.groups for t in coupled], optimizer, fn)
    lams = [(t.lam_l1, t.lam_group, t.lam_exclusive) for t in coupled]
    checked = plan.check(lams, optimizer, fn)
    if sharded:
        _sharded_metric_step(sharded, optimizer)
    plan.run_plain(checked)
    plan.run(checked, lams, [t.size_weighted for t in coupled], [t.exact for t in coupled])


def _sharded_metric_step(targets, optimizer) -> None:
    """The metric step of sharded targets (DTensors): fastprox.metric.foreach_metric_prox_ on
    the targets the optimizer has stepped, strengths not all 0."""
    state = _metric.AdamState(optimizer)
    pairs = [(t, found) for t in targets if (found := state.metric(t.param)) is not None
             and (t.lam_l1 != 0 or t.lam_group != 0 or t.lam_exclusive != 0)]
    if not pairs:
        return
    targets, found = zip(*pairs)
    v, lr, eps, beta2, step = zip(*found)
    _metric.foreach_metric_prox_(
        [t.param for t in targets], list(v), lr=list(lr), eps=list(eps), beta2=list(beta2),
        step=list(step), lam_l1=[t.lam_l1 for t in targets],
        lam_group=[t.lam_group for t in targets],
        lam_exclusive=[t.lam_exclusive for t in targets], dim=[t.dim for t in targets],
        size_weighted=[t.size_weighted for t in targets], exact=[t.exact for t in targets])
