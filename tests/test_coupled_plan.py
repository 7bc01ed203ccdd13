"""The coupled step's plans (fastprox/coupled_plan.py): built once, reused while nothing they
depend on changes, rebuilt when something does, and bitwise the step set by set."""

from __future__ import annotations

import pytest
import torch

import fastprox
from fastprox import CoupledGroups, Slice, coupled_plan, reference

from helpers import TOLERANCES, TinyMLP

ONE_PASS = [dict(lam_group=0.3), dict(lam_l1=0.05, lam_group=0.2),
            dict(lam_group=0.1, lam_exclusive=0.4, exact=False),
            dict(lam_exclusive=0.4, exact=False)]


def _sets(dtype=torch.float32):
    """Heads-and-neurons-like sets of two widths over shared and separate tensors, one of them
    float64 (its own accumulation dtype), in an order that mixes the widths."""
    torch.manual_seed(0)
    qkv, proj = torch.randn(12, 8, dtype=dtype), torch.randn(8, 4, dtype=dtype)
    up, down = torch.randn(10, 8, dtype=dtype), torch.randn(8, 10, dtype=dtype)
    bias = torch.randn(10, dtype=torch.float64)
    wide = [(qkv, 0, torch.arange(12) % 4 // 2, "qkv"), (proj, 1, torch.arange(4) // 2, "proj")]
    narrow = [(up, 0, torch.arange(10), "up"), (down, 1, torch.arange(10), "down")]
    odd = [(bias, 0, torch.arange(10) // 3 % 3, "bias")]
    return [qkv, proj, up, down, bias], [(narrow, 10), (wide, 2), (odd, 3)]


def _build(tensors, made, into):
    index = {id(t): i for i, t in enumerate(tensors)}
    return [CoupledGroups([Slice(into[index[id(m[0])]], *m[1:]) for m in ms], n)
            for ms, n in made]


@pytest.mark.parametrize("lams", ONE_PASS, ids=lambda d: ",".join(d))
def test_planned_step_is_each_set_alone_bit_for_bit_and_the_reference(lams):
    tensors, made = _sets()
    together, alone = [t.clone() for t in tensors], [t.clone() for t in tensors]
    fastprox.coupled_prox_(_build(tensors, made, together), **lams)
    for g in _build(tensors, made, alone):
        fastprox.coupled_prox_(g, **lams)
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    ref = [t.to(torch.float64) for t in tensors]
    index = {id(t): i for i, t in enumerate(tensors)}
    for ms, n in made:
        reference.coupled_prox_([(ref[index[id(m[0])]], *m[1:]) for m in ms], n, **lams)
    for a, b in zip(together, ref):
        torch.testing.assert_close(a.to(torch.float64), b, **TOLERANCES[torch.float32])


def _count_builds(monkeypatch):
    built = []
    real = coupled_plan.OnePassPlan.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(coupled_plan.OnePassPlan, "__init__", counting)
    return built


def test_plan_is_built_once_and_rebuilt_when_a_member_changes(monkeypatch):
    built = _count_builds(monkeypatch)
    tensors, made = _sets()
    work = [t.clone() for t in tensors]
    sets = _build(tensors, made, work)
    for _ in range(3):
        fastprox.coupled_prox_(sets, lam_group=0.01)
    assert len(built) == 1  # one wave of one kind: one plan, reused
    # a member's storage replaced (as a parameter's .data is): detected, a new plan, and the
    # step is what a fresh plan gives on the new storage
    work[2].data = torch.randn_like(work[2])
    expected = [t.clone() for t in work]
    fastprox.coupled_prox_(sets, lam_group=0.01)
    assert len(built) == 2
    coupled_plan._CACHE._plans.clear()
    fastprox.coupled_prox_(_build(tensors, made, expected), lam_group=0.01)
    for a, b in zip(work, expected):
        assert torch.equal(a, b)


def test_a_new_set_over_the_same_tensors_gets_its_own_plan():
    """A set built again over the same tensors with another grouping (the old one gone) is
    stepped by its own grouping, never by a plan of the old one."""
    w = torch.randn(6, 4)
    for index in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 0, 1, 2]),
                  torch.tensor([0, 0, 0, 1, 1, 1])):
        mine, ref = w.clone(), w.to(torch.float64)
        fastprox.coupled_prox_(CoupledGroups([Slice(mine, 0, index)], 3), lam_group=1.0)
        reference.coupled_prox_([(ref, 0, index)], 3, lam_group=1.0)
        torch.testing.assert_close(mine.to(torch.float64), ref, **TOLERANCES[torch.float32])


def test_thresholds_follow_the_learning_rate():
    """The plan keeps the last thresholds; a step with other ones (a scheduler's lr) uses the
    new ones: each step bitwise what a fresh plan gives."""
    tensors, made = _sets()
    planned = [t.clone() for t in tensors]
    sets = _build(tensors, made, planned)
    for lam in (0.05, 0.2, 0.2, 0.01):
        fresh = [t.clone() for t in planned]  # new sets: a plan of their own
        fastprox.coupled_prox_(_build(tensors, made, fresh), lam_group=lam, lam_exclusive=lam,
                               exact=False)
        fastprox.coupled_prox_(sets, lam_group=lam, lam_exclusive=lam, exact=False)
        for a, b in zip(planned, fresh):
            assert torch.equal(a, b), lam


def test_regularizer_euclidean_step_plans_once(monkeypatch):
    built = _count_builds(monkeypatch)
    model = TinyMLP()
    reg = fastprox.Regularizer(model, "neurons", lam=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        model(torch.randn(5, 6)).sum().backward()
        opt.step()
        reg.prox_step(opt)
    assert len(built) == 1


def test_plans_keep_no_set_or_tensor_alive():
    import gc
    import weakref

    w = torch.randn(6, 4)
    sets = [CoupledGroups([Slice(w, 0, torch.arange(6) // 2)], 3)]
    fastprox.coupled_prox_(sets, lam_group=0.1)
    dead = [weakref.ref(w), weakref.ref(sets[0])]
    del w, sets
    gc.collect()
    assert all(ref() is None for ref in dead)
