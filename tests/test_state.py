"""Regularizer and target-controller states: every load checks all of its input first, and a
state that does not fit changes nothing (neither the regularizer nor the model); targets that
would make a step fail after the optimizer moved the weights are refused when added."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastprox


def _mlp(width=16):
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _trained(width=16, steps=30, by_step=20):
    """An AdamW run with a units target, past by_step (the mask is held)."""
    model = _mlp(width)
    target = fastprox.SparsityTarget(kept=0.5, by_step=by_step)
    reg = fastprox.Regularizer(model, "group_lasso", lam=1e-3, target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, reg, opt, (x, y)


def _snapshot(model, reg):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(reg.state_dict())


def _unchanged(model, reg, snapshot):
    weights, state = snapshot
    for (name, a), b in zip(model.state_dict().items(), weights.values()):
        assert torch.equal(a, b), name
    now = reg.state_dict()
    assert now.keys() == state.keys()
    for key in ("steps", "prox", "targets"):
        assert now[key] == state[key], key
    c, s = now["controller"], state["controller"]
    assert c["log_scale"] == s["log_scale"] and c["steps"] == s["steps"]
    assert c["history"] == s["history"] and c["reached"] == s["reached"]
    assert (c["held"] is None) == (s["held"] is None)
    assert c["held"] is None or all(torch.equal(a, b) for a, b in zip(c["held"], s["held"]))


def _bad_states(state, other_width_state):
    def edit(fn):
        s = copy.deepcopy(state)
        fn(s)
        return s

    held = state["controller"]["held"]
    return {
        "one mask of shape (1,)": edit(lambda s: s["controller"].update(
            held=[torch.ones(1, dtype=torch.bool)])),
        "too few masks": edit(lambda s: s["controller"].update(held=held[:1])),
        "a mask of the wrong shape": edit(lambda s: s["controller"]["held"].__setitem__(
            0, torch.ones(5, dtype=torch.bool))),
        "a mask of the wrong dtype": edit(lambda s: s["controller"]["held"].__setitem__(
            0, held[0].float())),
        "a mask that is not a tensor": edit(lambda s: s["controller"]["held"].__setitem__(
            0, [True] * 12)),
        "another width": other_width_state,
        "log_scale of the wrong length": edit(lambda s: s["controller"].update(
            log_scale=[0.0, 0.0, 0.0])),
        "NaN log_scale": edit(lambda s: s["controller"].update(log_scale=[float("nan"), 0.0])),
        "reached of another pool": edit(lambda s: s["controller"].update(reached={"all": 0.5})),
        "negative controller steps": edit(lambda s: s["controller"].update(steps=-1)),
        "history of the wrong shape": edit(lambda s: s["controller"].update(history=[(1,)])),
        "another measure": edit(lambda s: s["controller"]["target"].update(measure="flops")),
        "no controller": edit(lambda s: s.pop("controller")),
        "a bad dim": edit(lambda s: s["targets"]["2.weight"].update(dim=5)),
        "a negative threshold": edit(lambda s: s["targets"]["4.weight"].update(lam_group=-1.0)),
        "an unknown setting": edit(lambda s: s["targets"]["0.weight"].update(colour="red")),
        "a bool flag that is not": edit(lambda s: s["targets"]["0.weight"].update(
            size_weighted="yes")),
        "a bad step count": edit(lambda s: s.update(steps="many")),
        "a bad prox": edit(lambda s: s.update(prox="newton")),
        "a missing target": edit(lambda s: s["targets"].pop("2.weight")),
        "not a dict": [1, 2, 3],
        "no steps": edit(lambda s: s.pop("steps")),
    }


def test_a_rejected_state_changes_nothing_and_a_good_one_resumes():
    model, reg, opt, (x, y) = _trained()
    state = reg.state_dict()
    _, other, _, _ = _trained(width=20)  # the same layers, another width
    snapshot = _snapshot(model, reg)
    for name, bad in _bad_states(state, other.state_dict()).items():
        with pytest.raises((ValueError, TypeError), match="Regularizer") as info:
            reg.load_state_dict(bad)
        _unchanged(model, reg, snapshot)
        # and the next step runs: nothing was half-applied
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            if n in reg.targets:  # the held mask still holds, nothing else was zeroed
                held = before[n] == 0
                assert bool((p.detach()[held] == 0).all()), (name, n)
                assert int((p.detach() == 0).sum()) == int(held.sum()), (name, n, info.value)
        snapshot = _snapshot(model, reg)
    # a good state from another regularizer of the same model loads whole
    twin = fastprox.Regularizer(model, "group_lasso", lam=1e-3,
                                target=fastprox.SparsityTarget(kept=0.5, by_step=20))
    twin.load_state_dict(reg.state_dict())
    assert twin.state_dict()["controller"]["steps"] == reg.controller.steps
    assert all(torch.equal(a, b) for a, b in zip(twin.controller.held, reg.controller.held))


def test_controller_state_alone_is_checked_before_it_is_taken():
    model, reg, _, _ = _trained()
    controller = reg.controller
    good = controller.state_dict()
    before = copy.deepcopy(good)
    bad = copy.deepcopy(good)
    bad["held"][0] = torch.ones(1, dtype=torch.bool)
    with pytest.raises(ValueError, match="SparsityTarget.load_state_dict: the held mask of "
                                         "0.weight must be a bool tensor of shape \\(12,\\)"):
        controller.load_state_dict(bad)
    assert controller.steps == before["steps"]
    assert all(torch.equal(a, b) for a, b in zip(controller.held, before["held"]))
    controller.load_state_dict(good)


def test_mid_ramp_state_of_a_per_layer_target_is_refused_by_a_pooled_one():
    # before by_step nothing is held: the strengths must still be this target's
    model, reg, _, _ = _trained(steps=10)
    layered = fastprox.Regularizer(_mlp(), "group_lasso", lam=1e-3, target=fastprox.SparsityTarget(
        kept=0.5, by_step=20, per_layer=True))
    state = layered.state_dict()
    snapshot = _snapshot(model, reg)
    with pytest.raises(ValueError, match="the saved target has per_layer=True"):
        reg.load_state_dict(state)
    state["controller"]["target"]["per_layer"] = False
    with pytest.raises(ValueError, match="log_scale must be a list of 2 finite numbers"):
        reg.load_state_dict(state)
    _unchanged(model, reg, snapshot)


def test_add_refuses_a_tensor_that_is_already_a_target():
    model = _mlp()
    reg = fastprox.Regularizer(model, "group_lasso", lam=1e-3)
    with pytest.raises(ValueError, match="Regularizer.add: again shares memory with the target "
                                         "0.weight"):
        reg.add("again", model[0].weight, lam_l1=1e-3)
    with pytest.raises(ValueError, match="shares memory with the target 2.weight"):
        reg.add("rows", model[2].weight[:3], lam_l1=1e-3)
    assert set(reg.targets) == {"0.weight", "2.weight", "4.weight"}
    # replacing a target by its own name is what add is for; a disjoint view is its own target
    reg.add("0.weight", model[0].weight, lam_l1=1e-3, lam_group=1e-3, dim=0)
    assert reg.targets["0.weight"].lam_l1 == 1e-3
    reg.add("bias", model[0].bias, lam_l1=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    model(torch.randn(4, 12)).sum().backward()
    opt.step()  # the step that used to fail after AdamW moved the weights
