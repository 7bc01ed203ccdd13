"""The metric step in training: the public ``foreach_metric_prox_`` against the float64 reference,
coupled groups in the metric, and ``Regularizer.attach`` choosing the step for each optimizer
(sparsity targets: tests/test_target.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fastprox
from fastprox import reference
from fastprox.metric import coupled_metric_prox_


def _v(shape):
    v = torch.exp(torch.empty(shape).uniform_(math.log(1e-6), math.log(1e-2)))
    v.view(-1)[::7] = 0
    return v


def test_public_op_matches_reference_with_per_tensor_settings():
    shapes = [((12, 9), 0), ((7, 5, 3), (1, 2)), ((20,), ())]
    ws = [torch.randn(s) * 0.05 for s, _ in shapes]
    vs = [_v(s) for s, _ in shapes]
    lrs, eps, steps = [1e-3, torch.tensor(2e-3), 5e-4], [1e-8, 1e-6, 1e-8], [3, torch.tensor(10.), 1]
    kw = dict(lam_l1=[0.0, 0.01, 0.02], lam_group=[0.5, 0.3, 0.0], lam_exclusive=[0.0, 0.0, 0.05],
              dim=[d for _, d in shapes])
    mine = [w.clone() for w in ws]
    fastprox.foreach_metric_prox_(mine, vs, lr=lrs, eps=eps, beta2=0.99, step=steps, **kw)
    removed = 0
    for i, (w, v) in enumerate(zip(ws, vs)):
        d = reference.adam_metric(v, float(steps[i]), 0.99, eps[i], float(lrs[i]))
        want = w.double().clone()
        reference.metric_prox_(want, d, lam_l1=kw["lam_l1"][i], lam_group=kw["lam_group"][i],
                               lam_exclusive=kw["lam_exclusive"][i], dim=shapes[i][1])
        torch.testing.assert_close(mine[i], want.float(), rtol=1e-5, atol=1e-6)
        removed += int((mine[i] == 0).sum() - (w == 0).sum())
    assert removed > 0
    # every lam 0: bit-identical
    same = [w.clone() for w in ws]
    fastprox.foreach_metric_prox_(same, vs, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(same, ws))


@pytest.mark.parametrize("call,words", [
    (lambda w, v: fastprox.foreach_metric_prox_(w[0], v, lr=1e-3), "weights must be a list"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v[:1], lr=1e-3), "exp_avg_sqs has 1"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, [v[0], v[0]], lr=1e-3, lam_group=0.1),
     "exp_avg_sqs\\[1\\] has shape"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v, lr=-1e-3, lam_group=0.1), "lr\\[0\\]"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v, lr=[1e-3, float("inf")], lam_group=0.1),
     "lr\\[1\\]"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v, lr=1e-3, beta2=1.0, lam_group=0.1),
     "beta2\\[0\\]"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v, lr=1e-3, step=0, lam_group=0.1),
     "step\\[0\\]"),
    (lambda w, v: fastprox.foreach_metric_prox_(w, v, lr=1e-3, lam_group=[0.1, -1.0]),
     "lam_group\\[1\\]"),
    (lambda w, v: fastprox.foreach_metric_prox_([w[0], w[0][:2]], [v[0], v[0][:2]], lr=1e-3,
                                                lam_group=0.1), "weights\\[0\\] and weights\\[1\\] share memory"),
])
def test_public_op_bad_input_names_the_argument_and_writes_nothing(call, words):
    ws = [torch.randn(6, 4), torch.randn(3, 5)]
    vs = [_v((6, 4)), _v((3, 5))]
    before = [w.clone() for w in ws]
    with pytest.raises((ValueError, TypeError), match="foreach_metric_prox_: " + words):
        call(ws, vs)
    assert all(torch.equal(a, b) for a, b in zip(ws, before))


@pytest.mark.parametrize("lams", [dict(lam_group=0.4), dict(lam_l1=0.05, lam_group=0.3),
                                  dict(lam_group=0.2, lam_exclusive=0.05),
                                  dict(lam_exclusive=0.05, exact=False)])
def test_coupled_metric_step_is_the_step_on_the_union(lams):
    """Rows of two tensors coupled (row g of each in group g; the second tensor's rows in another
    order) equal the metric step on the concatenated rows."""
    a, b = torch.randn(8, 5, dtype=torch.float64) * 0.1, torch.randn(8, 3, dtype=torch.float64)
    a[2] = 0
    b[2] = 0  # a zero group stays zero
    da = torch.exp(torch.empty(8, 5, dtype=torch.float64).uniform_(-2, 3))
    db = torch.exp(torch.empty(8, 3, dtype=torch.float64).uniform_(-2, 3))
    perm = torch.randperm(8)
    bp, dbp = b[perm].clone(), db[perm].clone()
    groups = fastprox.CoupledGroups([(a, 0, list(range(8))), (bp, 0, perm.tolist())], 8)
    want = torch.cat([a, b], dim=1)
    reference.metric_prox_(want, torch.cat([da, db], dim=1), dim=1, **lams)
    coupled_metric_prox_(groups, [da, dbp], **lams)
    torch.testing.assert_close(a, want[:, :5])
    torch.testing.assert_close(bp, want[:, 5:][perm])
    assert bool((a[2] == 0).all()) and not a.isnan().any()
    if lams.get("lam_group", 0) >= 0.3:
        assert 0 < int((a == 0).all(dim=1).sum()) < 8


@pytest.mark.parametrize("top", [1e3, 1e20], ids=["d-fits-float32", "d-squared-beyond-float32"])
def test_coupled_metric_step_of_float32_members(top):
    """Float32 members (solved in float32, or in float64 where d^2 would overflow float32)
    against the float64 reference on the union of each group's slices."""
    a, b = torch.randn(8, 5) * 0.1, torch.randn(8, 3) * 0.1
    a[2], b[2] = 0, 0
    da = torch.exp(torch.empty(8, 5).uniform_(-2, 3))
    db = torch.exp(torch.empty(8, 3).uniform_(-2, 3))
    db[5, 1] = top  # an element that barely moves
    perm = torch.randperm(8)
    bp, dbp = b[perm].clone(), db[perm].clone()
    lams = dict(lam_l1=0.01, lam_group=0.3)
    want = torch.cat([a, b], dim=1).double()
    reference.metric_prox_(want, torch.cat([da, db], dim=1).double(), dim=1, **lams)
    groups = fastprox.CoupledGroups([(a, 0, list(range(8))), (bp, 0, perm.tolist())], 8)
    coupled_metric_prox_(groups, [da, dbp], **lams)
    torch.testing.assert_close(a, want[:, :5].float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(bp, want[:, 5:][perm].float(), rtol=2e-5, atol=2e-6)
    assert bool((a[2] == 0).all()) and not a.isnan().any()
    assert 0 < int((a == 0).all(dim=1).sum()) < 8


def coupled_sizes_case(device="cpu"):
    """A coupled set whose groups differ in size (a member with two rows in group 0 and none in
    group 3), its metrics, and per group the reference metric step on the union of its
    elements (c_g = sqrt(n_g)): (groups, ds, members, want per member)."""
    a = torch.randn(5, 4, dtype=torch.float64) * 0.1
    b = torch.randn(5, 3, dtype=torch.float64) * 0.1
    index_b = [0, 0, 1, 2, 4]
    da = torch.exp(torch.empty(5, 4, dtype=torch.float64).uniform_(-2, 3))
    db = torch.exp(torch.empty(5, 3, dtype=torch.float64).uniform_(-2, 3))
    want_a, want_b = a.clone(), b.clone()
    lams = dict(lam_l1=0.02, lam_group=0.15, lam_exclusive=0.03)
    for g in range(5):
        rows_b = [k for k, i in enumerate(index_b) if i == g]
        z = torch.cat([a[g]] + [b[k] for k in rows_b])[None]
        d = torch.cat([da[g]] + [db[k] for k in rows_b])[None]
        reference.metric_prox_(z, d, dim=1, **lams)
        want_a[g] = z[0, :4]
        for j, k in enumerate(rows_b):
            want_b[k] = z[0, 4 + 3 * j:7 + 3 * j]
    a, b, da, db = (t.to(device) for t in (a, b, da, db))
    groups = fastprox.CoupledGroups([(a, 0, list(range(5))), (b, 0, index_b)], 5)
    return groups, [da, db], (a, b), (want_a, want_b), lams


def test_coupled_metric_groups_of_different_sizes():
    groups, ds, members, want, lams = coupled_sizes_case()
    assert len(set(groups.sizes.tolist())) > 1
    coupled_metric_prox_(groups, ds, **lams)
    for got, w in zip(members, want):
        torch.testing.assert_close(got, w)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _train(model, opt, steps, sched=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


ADAMS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                                                 weight_decay=0.1, amsgrad=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True, weight_decay=0.01),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adamw-tensor-lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-2)),
}


@pytest.mark.parametrize("name", list(ADAMS))
def test_attach_takes_the_metric_step_with_adam(name):
    """After every Adam / AdamW step (scheduler too) the weights equal the metric step of the
    optimizer's state applied to a twin trained without the regularizer."""
    model, twin = _mlp(), _mlp()
    opt, twin_opt = ADAMS[name](model.parameters()), ADAMS[name](twin.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, 2, 0.5)
    reg = fastprox.Regularizer(model, "sparse_group_lasso", lam=2e-3, lam_l1=1e-4)
    twin_reg = fastprox.Regularizer(twin, "sparse_group_lasso", lam=2e-3, lam_l1=1e-4)
    reg.attach(opt)
    for _ in range(6):
        _train(model, opt, 1)
        _train(twin, twin_opt, 1)
        with torch.no_grad():  # with the lr of the step (the scheduler steps after)
            for t in twin_reg.targets.values():
                s, group = twin_opt.state[t.param], twin_opt.param_groups[0]
                v = s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"]
                fastprox.foreach_metric_prox_(
                    [t.param], [v], lr=group["lr"], eps=group["eps"], beta2=group["betas"][1],
                    step=s["step"], lam_l1=t.lam_l1, lam_group=t.lam_group, dim=t.dim)
        sched.step()
        twin_sched.step()
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a, b), n
    assert reg.steps == 6 and reg.prox == "auto"
    assert sum(int((p == 0).sum()) for p in model.parameters()) > 0


def test_attach_chooses_per_optimizer_and_refuses_what_it_cannot_serve():
    model = _mlp()
    reg = fastprox.Regularizer(model, "group_lasso", lam=1e-3)
    with pytest.raises(ValueError, match="Regularizer.attach: no exact proximal step is known "
                                         "for RMSprop"):
        reg.attach(torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="prox='metric' needs torch.optim.Adam"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1), prox="metric")
    with pytest.raises(ValueError, match="prox must be one of"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1), prox="adam")
    # the explicit opt-in: the Euclidean step, thresholds lr * lam
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    reg.attach(opt, prox="euclidean")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()  # no grads: the step is the prox alone
    for n, p in model.named_parameters():
        want = before[n]
        if n in reg.targets:
            want = fastprox.group_shrink_(want.clone(), 1e-2 * 1e-3, dim=0)
        assert torch.equal(p.detach(), want), n
    # SGD: Euclidean under "auto"; a parameter Adam has not stepped yet is left alone
    assert fastprox.steps.prox_of(torch.optim.SGD(model.parameters(), lr=0.1), "auto",
                                   "f") == "euclidean"
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg2 = fastprox.Regularizer(model, "group_lasso", lam=10.0)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg2.prox_step(adam)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def test_readme_snippet_removes_units_with_adamw():
    """The README's training snippet (AdamW, lam 1.5e-3) on DIGITS removes units."""
    from fastprox.demo import data

    split = data.digits(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.LeakyReLU(), nn.Linear(40, 20), nn.LeakyReLU(),
                          nn.Linear(20, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = fastprox.Regularizer(model, "group_lasso", lam=1.5e-3)
    reg.attach(opt)
    n = len(split.x_train)
    for _ in range(60):
        order = torch.randperm(n)
        for i in range(0, n, 300):
            idx = order[i:i + 300]
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    stats = fastprox.sparsity_stats(model, reg)
    assert stats.hidden_units_kept < 0.8 * stats.hidden_units_total
    assert stats.input_features_kept < 0.9 * stats.input_features_total
    acc = (model(split.x_test).argmax(1) == split.y_test).float().mean().item()
    assert acc > 0.85


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def test_coupled_preset_takes_the_metric_step():
    """A conv net's channel groups (coupled) after AdamW: each set's metric step over its
    members, from the optimizer's state of each member."""
    model = _conv_net()
    x = torch.randn(2, 1, 6, 6)
    reg = fastprox.Regularizer(model, "channels", lam=0.05, example_inputs=x)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    loss = model(torch.randn(16, 1, 6, 6)).square().mean()
    loss.backward()
    twin_state = copy.deepcopy(model.state_dict())
    opt.step()
    assert reg.steps == 1
    zero = 0
    for t in reg.coupled.values():
        for m in t.groups.slices:
            dead = ~t.groups.alive()
            view = m.tensor.detach().movedim(m.axis, 0)[dead[m.index]]
            assert bool((view == 0).all())
            zero += int(dead.sum())
    assert zero > 0
    assert twin_state  # the step ran on the optimizer's state, not on a fresh one


@pytest.mark.parametrize("preset", ["group_lasso", ("heads", "neurons")])
def test_a_warmup_from_lr_zero_takes_the_identity_step(preset):
    """Hugging Face's linear warmup starts at lr 0: that step's proximal step is the identity
    (an infinite metric), for plain and coupled targets, and the next steps shrink as usual."""
    pytest.importorskip("transformers")
    import models as M

    torch.manual_seed(0)
    model = M.gpt2(layers=2, d=32, heads=4)
    reg = fastprox.Regularizer(model, preset, lam=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step / 3, 1.0))
    reg.attach(opt)
    x = torch.randint(0, 64, (4, 8))
    assert opt.param_groups[0]["lr"] == 0.0
    before = copy.deepcopy(model.state_dict())
    model(x, labels=x).loss.backward()
    opt.step()  # lr 0: Adam does not move, nor does the proximal step
    sched.step()
    for (name, a), b in zip(model.state_dict().items(), before.values()):
        assert torch.equal(a, b), name
    assert reg.steps == 1
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    for _ in range(5):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
        sched.step()
    assert sum(int((p == 0).sum()) for p in model.parameters()) > zeros


def test_coupled_metric_step_refuses_a_damaged_second_moment():
    """A NaN in one member's exp_avg_sq: the coupled step in the metric raises, naming the
    member, before any member is written (it used to zero the NaN's groups)."""
    model = _conv_net()
    x = torch.randn(2, 1, 6, 6)
    reg = fastprox.Regularizer(model, "channels", lam=0.05, example_inputs=x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(16, 1, 6, 6)).square().mean().backward()
    opt.step()
    opt.state[model[3].weight]["exp_avg_sq"][2, 1, 0, 0] = math.nan
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="member .*3.weight.* second moment \\(exp_avg_sq\\) "
                                         "has negative, NaN or infinite entries"):
        reg.prox_step(opt)
    for (name, a), b in zip(model.state_dict().items(), before.values()):
        assert torch.equal(a, b), name
