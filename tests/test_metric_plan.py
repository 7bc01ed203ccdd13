"""The Regularizer's plan of its coupled sets and plain targets in an AdamW step's metric
(fastprox/metric_plan.py): built at the first step and kept, rebuilt when something it depends
on changes (a state loaded, a parameter's data replaced, a parameter stepped for the first
time, another optimizer), always giving what a Regularizer planning afresh gives, and checking
every number before anything is written."""

from __future__ import annotations

import copy

import pytest
import torch

import fastprox

from helpers import TinyMLP


def _trained(seed=0, lr=1e-2, steps=1, preset="neurons", lam=0.05, **adam):
    """Two MLP blocks, their neurons regularized (coupled sets; ``preset="group_lasso"``: plain
    targets), after ``steps`` AdamW steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(TinyMLP(), TinyMLP())
    reg = fastprox.Regularizer(model, preset, lam=lam)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, **adam)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 6)).square().mean().backward()
        opt.step()
    return model, reg, opt


def _afresh(model, opt):
    """The step a new Regularizer (no plan yet) takes from the same weights and state."""
    model2 = copy.deepcopy(model)
    reg2 = fastprox.Regularizer(model2, "neurons", lam=0.05)
    opt2 = _like(opt, model, model2)
    reg2.prox_step(opt2)
    return model2


def _like(opt, model, model2):
    """An AdamW over ``model2`` with ``opt``'s parameter groups and state."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params2 = list(model2.parameters())
    opt2 = torch.optim.AdamW([{"params": [params2[index[id(p)]] for p in g["params"]]}
                              for g in opt.param_groups])
    opt2.load_state_dict(opt.state_dict())
    return opt2


def _same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_the_plan_is_built_once_and_kept():
    model, reg, opt = _trained()
    reg.prox_step(opt)
    plan = reg._metric_plan
    assert plan is not None
    want = _afresh(model, opt)
    reg.prox_step(opt)
    assert reg._metric_plan is plan
    _same(model, want)


@pytest.mark.parametrize("change", ["state loaded", "data replaced"])
def test_what_the_plan_depends_on_is_read_again(change):
    """The optimizer's state replaced (load_state_dict: new second moments, new step counts),
    or a parameter's data replaced (new storage): the plan is rebuilt and the step reads the
    new moments, the weight where it now lies."""
    model, reg, opt = _trained()
    reg.prox_step(opt)
    plan = reg._metric_plan
    if change == "state loaded":
        _, _, other = _trained(seed=1, steps=3)
        opt.load_state_dict(other.state_dict())
    else:
        with torch.no_grad():
            model[0].up.weight.data = model[0].up.weight.data.clone() * 1.5
    want = _afresh(model, opt)
    reg.prox_step(opt)
    assert reg._metric_plan is not plan
    _same(model, want)


def test_strengths_and_learning_rates_are_read_every_step():
    model, reg, opt = _trained()
    reg.prox_step(opt)
    plan = reg._metric_plan
    for t in reg.coupled.values():
        t.lam_group = 0.2
    for group in opt.param_groups:
        group["lr"] = 3e-2
    model2 = copy.deepcopy(model)
    reg2 = fastprox.Regularizer(model2, "neurons", lam=0.2)
    reg2.prox_step(_like(opt, model, model2))
    reg.prox_step(opt)
    assert reg._metric_plan is plan
    _same(model, model2)


def _stepped_later(preset):
    """The second block's ``up.weight`` left out of the first AdamW step (no state: the prox
    step leaves it, and the set it is a member of, as they are), then stepped:
    (model, reg, opt, the plan of the first prox step, that weight after it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(TinyMLP(), TinyMLP())
    reg = fastprox.Regularizer(model, preset, lam=0.05)
    opt = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    opt.add_param_group({"params": list(model[1].parameters()), "lr": 1e-2})
    model[1].up.weight.requires_grad_(False)  # not stepped: no state
    model(torch.randn(16, 6)).square().mean().backward()
    opt.step()
    late = model[1].up.weight.detach().clone()
    reg.prox_step(opt)
    assert torch.equal(model[1].up.weight, late)  # not stepped: left out
    plan = reg._metric_plan
    model[1].up.weight.requires_grad_(True)
    opt.zero_grad()
    model(torch.randn(16, 6)).square().mean().backward()
    opt.step()
    return model, reg, opt, plan, late


def test_a_set_whose_parameters_are_stepped_later_joins_the_step():
    """The second block outside the optimizer's step at first (its set is left as it is), then
    stepped: the plan is rebuilt and its set is stepped too."""
    model, reg, opt, plan, late = _stepped_later("neurons")
    want = _afresh(model, opt)
    reg.prox_step(opt)
    assert reg._metric_plan is not plan
    _same(model, want)
    assert not torch.equal(model[1].up.weight, late)


@pytest.mark.parametrize("case, match", [
    ("negative lr", r"Regularizer.prox_step: lr\[0\] must be a finite number >= 0"),
    ("eps nan", r"Regularizer.prox_step: eps\[2\] must be a finite number >= 0, got nan"),
    ("beta2 one", r"Regularizer.prox_step: beta2\[0\] must be in \[0, 1\)"),
    ("lr 0 and not", "have learning rates .*some 0, some not"),
])
def test_a_refused_number_names_the_member_and_writes_nothing(case, match):
    model, reg, opt = _trained()
    reg.prox_step(opt)  # planned
    if case == "negative lr":
        opt.param_groups[0]["lr"] = -1e-3
    elif case == "lr 0 and not":
        opt.add_param_group({"params": [], "lr": 0.0})
        w = model[1].down.weight
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not w]
        opt.param_groups[1]["params"] = [w]
    elif case == "eps nan":  # member 2 (down.weight) of the second set in a group of its own
        w = model[1].down.weight
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not w]
        opt.add_param_group({"params": [w], "eps": float("nan")})
    else:
        opt.param_groups[0]["betas"] = (0.9, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        reg.prox_step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_a_member_outside_the_optimizer_is_named():
    model, reg, opt = _trained()
    opt2 = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(ValueError, match="are not parameters of the optimizer"):
        reg.prox_step(opt2)


# -- plain targets: planned with the sets, the same step as the public op ------------------------

def _plain(seed=0, steps=1):
    return _trained(seed=seed, steps=steps, preset="group_lasso")


def _public(reg, opt):
    """Copies of the targets' weights after fastprox.foreach_metric_prox_, fed from the
    optimizer's state and groups by hand: what the plan's step must give."""
    ts = [t for t in reg.targets.values() if t.param in opt.state]
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    weights = [t.param.detach().clone() for t in ts]
    fastprox.foreach_metric_prox_(
        weights, [opt.state[t.param]["exp_avg_sq"] for t in ts],
        lr=[group[id(t.param)]["lr"] for t in ts], eps=[group[id(t.param)]["eps"] for t in ts],
        beta2=[group[id(t.param)]["betas"][1] for t in ts],
        step=[opt.state[t.param]["step"] for t in ts],
        lam_l1=[t.lam_l1 for t in ts], lam_group=[t.lam_group for t in ts],
        lam_exclusive=[t.lam_exclusive for t in ts], dim=[t.dim for t in ts],
        size_weighted=[t.size_weighted for t in ts], exact=[t.exact for t in ts])
    return dict(zip([t.name for t in ts], weights))


def _same_as(reg, want):
    for name, w in want.items():
        assert torch.equal(reg.targets[name].param, w), name


def test_plain_targets_are_planned_once_and_step_as_the_public_op():
    model, reg, opt = _plain()
    assert len(reg.targets) >= 4
    want = _public(reg, opt)
    reg.prox_step(opt)
    plan = reg._metric_plan
    _same_as(reg, want)
    for t in reg.targets.values():  # strengths and learning rates: read at every step
        t.lam_group = 0.1
    opt.param_groups[0]["lr"] = 3e-2
    want = _public(reg, opt)
    reg.prox_step(opt)
    assert reg._metric_plan is plan
    _same_as(reg, want)


@pytest.mark.parametrize("change", ["state loaded", "data replaced", "dim changed"])
def test_what_a_plain_target_depends_on_is_read_again(change):
    model, reg, opt = _plain()
    reg.prox_step(opt)
    plan = reg._metric_plan
    target = reg.targets["0.up.weight"]
    if change == "state loaded":
        _, _, other = _plain(seed=1, steps=3)
        opt.load_state_dict(other.state_dict())
    elif change == "data replaced":
        with torch.no_grad():
            model[0].up.weight.data = model[0].up.weight.data.clone() * 1.5
    else:
        target.dim = 1  # its rows (output units) now, where it was its columns
    want = _public(reg, opt)
    reg.prox_step(opt)
    assert reg._metric_plan is not plan
    _same_as(reg, want)


def test_a_plain_target_stepped_later_joins_the_step():
    model, reg, opt, plan, _ = _stepped_later("group_lasso")
    want = _public(reg, opt)
    assert "1.up.weight" in want
    reg.prox_step(opt)
    assert reg._metric_plan is not plan
    _same_as(reg, want)


@pytest.mark.parametrize("case, match", [
    ("negative lr", r"Regularizer.prox_step: lr\['0.up.weight'\] must be a finite number >= 0"),
    ("nan strength", r"Regularizer.prox_step: 1.down.weight: lam_group must be a finite number"),
    ("damaged moment", r"1.up.weight: the second moment \(exp_avg_sq\) has negative, NaN or "
                       "infinite entries"),
])
def test_a_refused_plain_target_is_named_and_nothing_is_written(case, match):
    """Plain targets, planned: a refused learning rate or strength, or a damaged second
    moment, names the target, and no weight changes."""
    model, reg, opt = _plain()
    reg.prox_step(opt)  # planned
    if case == "negative lr":
        w = model[0].up.weight
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not w]
        opt.add_param_group({"params": [w], "lr": -1e-3})
    elif case == "nan strength":
        reg.targets["1.down.weight"].lam_group = float("nan")
    else:
        opt.state[model[1].up.weight]["exp_avg_sq"][0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        reg.prox_step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("preset", ["neurons", "group_lasso"])
def test_one_transfer_a_step_checks_every_moment_once(preset, monkeypatch):
    """The step reads the optimizer's numbers and the bounds of every second moment it reads in
    one transfer (one host synchronisation on a GPU), each moment's view reduced once, and the
    ops are told the values are checked (they check only where the moments lie)."""
    from fastprox import metric_plan

    model, reg, opt = _trained(preset=preset)
    reg.prox_step(opt)  # planned
    plan = reg._metric_plan
    reads, reduced, told = [], [], []
    read, aminmax = metric_plan._read, torch.aminmax

    def counting_read(*args, **kwargs):
        reads.append(len(args[1]))
        return read(*args, **kwargs)

    def counting_aminmax(t, *args, **kwargs):
        reduced.append(t)
        return aminmax(t, *args, **kwargs)

    class Ops:  # the op namespace, recording the flag each call passes
        def __getattr__(self, name):
            def call(*args):
                told.append(args[-1])
                return getattr(torch.ops.fastprox, name)(*args)
            return call

    want = _public(reg, opt) if preset == "group_lasso" else None
    twin = None if want is not None else _afresh(model, opt)
    op = metric_plan._op
    monkeypatch.setattr(metric_plan, "_read", counting_read)
    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    monkeypatch.setattr(metric_plan, "ops", Ops())
    monkeypatch.setattr(metric_plan, "_op", lambda *a, **k: (told.append(k["moments_checked"]),
                                                             op(*a, **k))[1])
    reg.prox_step(opt)
    assert reg._metric_plan is plan
    assert reads == [len(plan.checks)] and len(reduced) == len(plan.checks) > 1
    assert len({id(t) for t in reduced}) == len(reduced)
    assert told == [True]
    if want is not None:
        _same_as(reg, want)
    else:
        _same(model, twin)
