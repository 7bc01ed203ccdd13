"""The Triton entries' kept launch plans (kernels/kept_plans.py): a step over the same weights
launches the plan of the step before without planning again, with the thresholds, metric and
moments of the call (their values are never kept); a step over other layouts, other zero
thresholds, other tiling limits, or weights that need working copies is planned again. Every
result is compared with the same call served by the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastprox
from helpers import TOLERANCES
from kernel_calls import DEVICE, served_by

from fastprox.kernels import kept_plans, launch, metric_prox, tiles

pytestmark = pytest.mark.triton_only

SHAPES = [((7, 37), 1), ((6, 5, 3, 3), (1, 2, 3)), ((33, 9), 0), ((129,), 0)]


def _weights():
    return [torch.randn(shape, device=DEVICE) for shape, _ in SHAPES]


def _prox(ws, lam_l1, lam_group, lam_exclusive=0.0):
    fastprox.foreach_prox_(ws, lam_l1=lam_l1, lam_group=lam_group, lam_exclusive=lam_exclusive,
                           dim=[d for _, d in SHAPES])


def _checked(ws, want):
    for i, (got, w) in enumerate(zip(ws, want)):
        torch.testing.assert_close(got, w, **TOLERANCES[torch.float32], msg=f"weights[{i}]")


def _reference_prox(ws, *lams):
    want = [w.clone() for w in ws]
    with served_by("reference"):
        _prox(want, *lams)
    return want


@pytest.fixture
def planned(monkeypatch):
    """Counts the plans the fused and the metric entries make, from none kept: a plan an
    earlier test kept for tensors at the addresses this test's tensors happen to get would be
    launched (as it should) without planning."""
    monkeypatch.setattr(kept_plans, "plans", kept_plans.KeptPlans())
    count = {"prox": 0, "metric": 0}
    plan_prox, plan_metric_step = launch.plan_prox, metric_prox.plan_metric_step

    def counting_prox(*args, **kwargs):
        count["prox"] += 1
        return plan_prox(*args, **kwargs)

    def counting_metric(*args, **kwargs):
        count["metric"] += 1
        return plan_metric_step(*args, **kwargs)

    monkeypatch.setattr(launch, "plan_prox", counting_prox)
    monkeypatch.setattr(metric_prox, "plan_metric_step", counting_metric)
    return count


def test_a_step_over_the_same_weights_launches_its_kept_plan(backend, planned):
    ws = _weights()
    for step, lams in enumerate([(0.05, 0.2), (0.02, 0.3), (0.07, 0.1)]):
        want = _reference_prox(ws, *lams)
        _prox(ws, *lams)
        _checked(ws, want)
        assert planned["prox"] == 1, f"step {step} planned again"
    assert any(0 < int((w == 0).sum()) < w.numel() for w in ws)  # the steps removed something


@pytest.mark.parametrize("change", ["a threshold set to 0", "a new weight", "a view",
                                    "tiling limits", "an exclusive step"])
def test_a_step_over_what_the_plan_did_not_see_is_planned_again(backend, planned, change,
                                                                monkeypatch):
    ws = _weights()
    _prox(ws, 0.05, 0.4)
    lams = (0.05, 0.4)
    if change == "a threshold set to 0":
        lams = (0.0, 0.4)  # the soft threshold no longer compiled in
    elif change == "a new weight":
        ws[1] = torch.randn(6, 5, 3, 3, device=DEVICE).transpose(2, 3)  # other strides
    elif change == "a view":  # not dense: a working copy, written back, planned every call
        base = torch.randn(7, 74, device=DEVICE)
        ws[0] = base[:, ::2]
    elif change == "tiling limits":
        monkeypatch.setattr(tiles, "ONE_TILE_ELEMS", 16)
        monkeypatch.setattr(tiles, "TILE_ELEMS", 8)
    else:
        lams = (0.05, 0.4, 0.01)
    for step in range(2):
        want = _reference_prox(ws, *lams)
        _prox(ws, *lams)
        _checked(ws, want)
    assert planned["prox"] == (3 if change == "a view" else 2)


METRIC = dict(lr=1.0, eps=1e-8, beta2=0.999)


def _metric(ws, vs, step, lam_group):
    fastprox.foreach_metric_prox_(ws, vs, step=step, lam_l1=0.1, lam_group=lam_group,
                                  dim=[d for _, d in SHAPES], **METRIC)


def test_the_metric_step_keeps_its_plan_and_reads_each_calls_moments(backend, planned):
    ws = _weights()
    vs = [torch.rand_like(w) * 1e-2 for w in ws]
    for step in range(1, 4):
        for v in vs:  # new values in the same tensors: the plan keeps none of them
            v.mul_(0.5).add_(torch.rand_like(v) * 1e-2)
        want = [w.clone() for w in ws]
        with served_by("reference"):
            _metric(want, vs, step, 0.05 * step)
        _metric(ws, vs, step, 0.05 * step)
        _checked(ws, want)
    assert planned["metric"] == 1
    assert any(0 < int((w == 0).sum()) < w.numel() for w in ws)


def test_a_moment_laid_out_unlike_its_weight_is_planned_every_call(backend, planned):
    ws = _weights()
    vs = [torch.rand_like(w) * 1e-2 for w in ws]
    vs[0] = (torch.rand(37, 7, device=DEVICE) * 1e-2).t()  # a copy laid out as the weight
    for step in (1, 2):
        want = [w.clone() for w in ws]
        with served_by("reference"):
            _metric(want, vs, step, 0.05)
        _metric(ws, vs, step, 0.05)
        _checked(ws, want)
    assert planned["metric"] == 2


def test_kept_plans_are_few_and_hold_no_weight():
    """The cache drops the least recently used plan past its capacity, and a kept launch holds
    slots where the call's weights and tables go."""
    kept = kept_plans.KeptPlans(capacity=2)
    for k in range(3):
        kept.keep(k, [])
    assert list(kept.plans) == [1, 2] and kept.get(0) is None and kept.get(1) == []
    w = torch.randn(4, 8, device=DEVICE)
    table = torch.zeros(1, 3, dtype=torch.float64, device=DEVICE)
    run = kept_plans.kept_run([launch.Launch("prox_kernel", (1,), (w, 3, table), {}, [{}])],
                              {id(w): 0, id(table): "lams"}, {})
    assert not any(isinstance(a, torch.Tensor) for la in run.launches for a in la.args)
