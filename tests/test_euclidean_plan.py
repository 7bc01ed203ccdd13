"""The Regularizer's plan of its Euclidean step (fastprox/euclidean_plan.py): built at the first
step and kept, rebuilt when something it depends on changes (a parameter's data replaced, a
target's ``dim``, the optimizer's parameter groups, a given lr in place of an optimizer),
always giving what the public ``foreach_prox_`` gives with thresholds ``lr * lam``, and
checking every threshold before anything is written."""

from __future__ import annotations

import copy

import pytest
import torch

import fastprox

from helpers import TinyMLP


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(TinyMLP(), TinyMLP())


def _sgd_step(model, opt):
    opt.zero_grad()
    model(torch.randn(16, 6)).square().mean().backward()
    opt.step()


def _by_hand(reg, lrs):
    """The plain targets' step through the public foreach_prox_, thresholds lr * lam with the
    lr of each target's parameter (``lrs[name]``), on clones: {name: stepped clone}."""
    ts = list(reg.targets.values())
    ws = [t.param.detach().clone() for t in ts]
    fastprox.foreach_prox_(ws, lam_l1=[lrs[t.name] * t.lam_l1 for t in ts],
                           lam_group=[lrs[t.name] * t.lam_group for t in ts],
                           lam_exclusive=[lrs[t.name] * t.lam_exclusive for t in ts],
                           dim=[t.dim for t in ts], size_weighted=[t.size_weighted for t in ts],
                           exact=[t.exact for t in ts])
    return {t.name: w for t, w in zip(ts, ws)}


def _check_by_hand(reg, want):
    for t in reg.targets.values():
        assert torch.equal(t.param, want[t.name]), t.name


def _two_groups(model, lr0=0.1, lr1=0.05):
    return torch.optim.SGD([{"params": list(model[0].parameters()), "lr": lr0},
                            {"params": list(model[1].parameters()), "lr": lr1}])


def _lrs(reg, opt):
    group = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {t.name: group[id(t.param)] for t in reg.targets.values()}


@pytest.mark.parametrize("preset", ["group_lasso", "sparse_group_lasso", "cges"])
def test_the_plan_is_built_once_kept_and_matches_the_public_op(preset):
    model = _model()
    reg = fastprox.Regularizer(model, preset, lam=0.3)
    opt = _two_groups(model)
    for step in range(3):
        _sgd_step(model, opt)
        want = _by_hand(reg, _lrs(reg, opt))
        reg.prox_step(opt)
        if step == 0:
            plan = reg._euclidean_plan
            assert plan is not None
        assert reg._euclidean_plan is plan
        _check_by_hand(reg, want)


def test_learning_rates_and_strengths_are_read_every_step():
    model = _model()
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.3)
    opt = _two_groups(model)
    reg.prox_step(opt)
    plan = reg._euclidean_plan
    opt.param_groups[1]["lr"] = 0.4
    opt.param_groups[0]["lr"] = torch.tensor(0.2, dtype=torch.float64)  # a tensor lr too
    for t in reg.targets.values():
        t.lam_group *= 2
    lrs = {name: float(v) for name, v in _lrs(reg, opt).items()}
    want = _by_hand(reg, lrs)
    reg.prox_step(opt)
    assert reg._euclidean_plan is plan
    _check_by_hand(reg, want)


@pytest.mark.parametrize("change", ["data replaced", "dim changed", "group added",
                                    "another optimizer", "an lr given"])
def test_what_the_plan_depends_on_is_read_again(change):
    model = _model()
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.3)
    opt = _two_groups(model)
    reg.prox_step(opt)
    plan = reg._euclidean_plan
    lrs = _lrs(reg, opt)
    name = "0.up.weight"
    if change == "data replaced":
        with torch.no_grad():
            model[0].up.weight.data = model[0].up.weight.data.clone() * 1.5
    elif change == "dim changed":
        reg.targets[name].dim = 1  # rows (output units), where it had columns
    elif change == "group added":  # the second block moved to a group of its own lr
        opt = torch.optim.SGD(list(model[0].parameters()), lr=0.1)
        opt.add_param_group({"params": list(model[1].parameters()), "lr": 0.7})
        lrs = _lrs(reg, opt)
    elif change == "another optimizer":
        opt = _two_groups(model, 0.1, 0.05)
    else:
        lrs = {n: 0.25 for n in lrs}
    want = _by_hand(reg, lrs)
    if change == "an lr given":
        reg.prox_step(lr=0.25)
    else:
        reg.prox_step(opt)
    assert reg._euclidean_plan is not plan
    _check_by_hand(reg, want)
    assert reg.targets[name].param is dict(model.named_parameters())[name]


def _coupled(model):
    reg = fastprox.Regularizer(model, "neurons", lam=0.3)
    assert reg.coupled and not reg.targets
    return reg


def test_coupled_sets_step_as_a_fresh_regularizer_does_and_read_the_lr_every_step():
    model = _model()
    twin = copy.deepcopy(model)
    reg, reg_twin = _coupled(model), _coupled(twin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.prox_step(opt)
    plan = reg._euclidean_plan
    opt.param_groups[0]["lr"] = 0.3
    reg.prox_step(opt)
    assert reg._euclidean_plan is plan
    reg_twin.prox_step(lr=0.1)
    _coupled(twin).prox_step(lr=0.3)  # a new regularizer: planned afresh
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("preset", ["group_lasso", "neurons"])
@pytest.mark.parametrize("bad, match", [
    (-0.1, r"must be a finite number >= 0, got -0.1"),
    (float("nan"), r"must be a finite number >= 0, got nan"),
    (float("inf"), r"must be a finite number >= 0, got inf"),
    (torch.tensor(-0.1, dtype=torch.float64), r"must be a finite number >= 0, got -0.1")],
    ids=["negative", "nan", "inf", "negative tensor"])
def test_a_refused_threshold_names_its_target_and_writes_nothing(preset, bad, match):
    """The second block's lr refused (after a first step that built the plan; a number or a
    0-d CPU tensor): the error names a target or set of that block, and nothing is written,
    the first block's neither."""
    model = _model()
    reg = fastprox.Regularizer(model, preset, lam=0.3)
    opt = _two_groups(model)
    reg.prox_step(opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1]["lr"] = bad
    named = r"Regularizer.prox_step: the lr of (1\.|neurons:1)\S* "
    with pytest.raises(ValueError, match=named + match):
        reg.prox_step(opt)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_a_set_across_groups_of_different_learning_rates_is_refused_before_any_write():
    model = _model()
    reg = _coupled(model)
    down = model[0].down
    rest = [p for p in model.parameters() if p is not down.weight]
    opt = torch.optim.SGD([{"params": rest, "lr": 0.1}, {"params": [down.weight], "lr": 0.1}])
    reg.prox_step(opt)  # the same lr: one learning rate for the set
    opt.param_groups[1]["lr"] = 0.2
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="different learning rates"):
        reg.prox_step(opt)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_a_target_outside_the_optimizer_is_refused():
    model = _model()
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.3)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"1\.up\.weight.*not parameters of the optimizer"):
        reg.prox_step(opt)
