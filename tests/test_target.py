"""Sparsity targets (``SparsityTarget``, fastprox/target.py): the budget holds every pool on its
schedule at every step (counted here from the weights, not from the controller), from any
strength, with AdamW and SGD; the pools (by kind, per layer, uniform, one pool, min_kept);
params and FLOPs against the compacted model; the value a protected group gets back; resume
mid-ramp and after the hold, bitwise; warnings when a pool cannot follow its schedule; L0 gates."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import fastprox
import models as M


def _wide(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def _data(seed=0, n=200):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x @ torch.randn(12, 3, generator=g)).argmax(dim=1)
    return x, y


def _optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _attached(target, lam, model=None, optimizer="adamw"):
    """(model, regularizer, optimizer): group lasso at ``lam`` with ``target`` on ``_wide()``
    (or ``model``), attached."""
    model = _wide() if model is None else model
    reg = fastprox.Regularizer(model, "group_lasso", lam=lam, target=target)
    opt = _optimizer(optimizer, model)
    reg.attach(opt)
    return model, reg, opt


def _schedule(total, kept, by_step, step):
    """What the schedule allows removed at ``step`` (units): counted here, apart from the
    controller's code."""
    remove = total - math.floor(kept * total + 0.5)
    return math.floor(remove * min(step / by_step, 1.0) + 0.5)


def _plain_dead(model, names):
    params = dict(model.named_parameters())
    return {n: int((fastprox.group_norms(params[n].detach(), 0) == 0).sum()) for n in names}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("lam", [1e-5, 1e-2])
def test_plain_pools_follow_the_schedule_at_every_step(optimizer, lam):
    """From a strength that removes nothing and from one that would remove nearly everything at
    once, each pool (the input features; the hidden units) is on its schedule after every step,
    and at the target from by_step on."""
    x, y = _data()
    kept, by_step = 0.3, 30
    model, reg, opt = _attached(fastprox.SparsityTarget(kept=kept, by_step=by_step), lam,
                                optimizer=optimizer)
    pools = {"features": ["0.weight"], "units": ["2.weight", "4.weight"]}
    totals = {"features": 12, "units": 48 + 32}
    assert [p.name for p in reg.controller.pools] == list(pools)
    for step in range(1, 41):
        _step(model, opt, x, y)
        dead = _plain_dead(model, ["0.weight", "2.weight", "4.weight"])
        for pool, names in pools.items():
            removed = sum(dead[n] for n in names)
            assert removed == _schedule(totals[pool], kept, by_step, step), (pool, step)
    assert reg.controller.reached == {"features": 4 / 12, "units": 24 / 80}
    assert all(t.lam_group == 0 for t in reg.targets.values() if t.param.dim() > 1)


def _coupled_dead(reg):
    return {n: int((~t.groups.alive()).sum()) for n, t in reg.coupled.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lam", [1e-5, 1e-2])
def test_heads_and_neurons_reach_the_target_each_on_its_own(arch, lam):
    """Coupled heads and neurons of a Hugging Face GPT-2 / Llama (GQA: KV heads with their query
    heads) under AdamW: each kind is its own pool, on its schedule at every step."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = M.gpt2(layers=2, d=32, heads=4) if arch == "gpt2" else \
        M.llama(layers=2, d=32, heads=4, kv_heads=2, ff=48)
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    kept, by_step = 0.5, 12
    target = fastprox.SparsityTarget(kept=kept, by_step=by_step)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=lam, target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    kinds = {"heads": [n for n in reg.coupled if n.startswith("heads")],
             "neurons": [n for n in reg.coupled if n.startswith("neurons")]}
    totals = {k: sum(reg.coupled[n].groups.num_groups for n in names)
              for k, names in kinds.items()}
    for step in range(1, 16):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
        dead = _coupled_dead(reg)
        for kind, names in kinds.items():
            assert sum(dead[n] for n in names) == _schedule(totals[kind], kept, by_step, step), \
                (kind, step)
    assert reg.controller.reached == {"heads": 0.5, "neurons": 0.5}
    stats = fastprox.stats.coupled_stats(reg)
    assert [(p.name, p.fraction) for p in stats.pools] == [("heads", 0.5), ("neurons", 0.5)]
    assert "| heads | units |" in stats.to_markdown()
    for t in reg.coupled.values():  # every member of a removed group is zero
        dead = ~t.groups.alive()
        for m in t.groups.slices:
            assert bool((m.tensor.detach().movedim(m.axis, 0)[dead[m.index]] == 0).all())


def test_groups_over_the_budget_get_their_value_from_before_the_step():
    """A strength that zeroes every group in one step: the schedule's few go (the weakest
    before the step), every other group is left exactly as the optimizer left it."""
    torch.manual_seed(0)
    model = _wide()
    target = fastprox.SparsityTarget(kept=0.5, by_step=10, layers=("2.weight",))
    reg = fastprox.Regularizer(model, "group_lasso", lam=10.0, target=target)
    w = model[2].weight
    with torch.no_grad():  # distinct column norms, so "weakest" is one set
        w.mul_(torch.linspace(0.5, 2.0, 48))
    before = w.detach().clone()
    reg.prox_step(lr=1.0)
    norms = before.norm(dim=0)
    allowed = _schedule(48, 0.5, 10, 1)
    weakest = norms.argsort()[:allowed]
    dead = fastprox.group_norms(w.detach(), 0) == 0
    assert int(dead.sum()) == allowed == 2
    assert bool(dead[weakest].all())
    assert torch.equal(w.detach()[:, ~dead], before[:, ~dead])
    # the dual ascent saw a step that wanted all 48 gone: the strength went down
    assert reg.controller.log_scale[0] < 0
    assert reg.targets["2.weight"].lam_group < 10.0


@pytest.mark.parametrize("hold", [True, False])
def test_the_strongest_part_of_what_is_kept_is_spared_the_shrinkage(hold):
    """At step s the strongest groups (by their norm before the step), as many as
    ramp(s) * kept of the pool, keep their values from before the step; every other live group
    is shrunk. The share rises with the schedule: none at the start, all of what is kept at
    by_step (with hold=False the budget and the sparing go on after it)."""
    torch.manual_seed(0)
    model = _wide()
    target = fastprox.SparsityTarget(kept=0.5, by_step=8, layers=("2.weight",), hold=hold)
    # a strength too small for the step to zero a group: the schedule's removals are the
    # budget's, and every group alive after the step and not spared was shrunk
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.002, target=target)
    w = model[2].weight
    with torch.no_grad():  # distinct column norms: "strongest" is one set
        w.mul_(torch.linspace(0.5, 2.0, 48)[torch.randperm(48)])
    for step in range(1, 12):
        before = w.detach().clone()
        reg.prox_step(lr=1.0)
        after = w.detach()
        live = fastprox.group_norms(before, 0) > 0
        spared = math.floor(min(step / 8, 1.0) * 0.5 * 48 + 1e-9)
        if hold and step > 8:  # held: no strength, nothing is shrunk and no group comes back
            assert torch.equal(after[:, live], before[:, live]), step
            continue
        order = before.norm(dim=0).argsort(descending=True)
        top = order[:spared]
        assert torch.equal(after[:, top], before[:, top]), step
        rest = order[spared:]
        rest = rest[after[:, rest].norm(dim=0) > 0]
        assert len(rest) == 48 - spared - _schedule(48, 0.5, 8, step), step
        assert bool((after[:, rest].norm(dim=0) < before[:, rest].norm(dim=0)).all()), step
    assert _plain_dead(model, ["2.weight"]) == {"2.weight": 24}


@pytest.mark.parametrize("options, pools", [
    (dict(), ["features", "units"]),
    (dict(by_kind=False), ["all"]),
    (dict(per_layer=True), ["0.weight", "2.weight", "4.weight"]),
])
def test_pools(options, pools):
    x, y = _data()
    model, reg, opt = _attached(fastprox.SparsityTarget(kept=0.25, by_step=20, **options), 1e-3)
    for _ in range(22):
        _step(model, opt, x, y)
    assert list(reg.controller.reached) == pools
    dead = _plain_dead(model, ["0.weight", "2.weight", "4.weight"])
    sizes = {"0.weight": 12, "2.weight": 48, "4.weight": 32}
    members = {"features": ["0.weight"], "units": ["2.weight", "4.weight"],
               "all": list(sizes)} | {n: [n] for n in sizes}
    for pool in pools:
        total = sum(sizes[n] for n in members[pool])
        left = total - sum(dead[n] for n in members[pool])
        assert left == math.floor(0.25 * total + 0.5), pool
        assert reg.controller.reached[pool] == left / total
    # the stats report every pool
    stats = fastprox.sparsity_stats(model, reg)
    assert [p.name for p in stats.pools] == pools
    for p in stats.pools:
        assert p.fraction == reg.controller.reached[p.name] and p.goal == p.kept
        assert p.left == p.fraction * p.total and p.measure == "units"
    text = stats.to_markdown()
    assert all(f"| {name} | units |" in text for name in pools)
    assert stats.as_dict()["pools"][0]["name"] == pools[0]


def test_uniform_keeps_one_width_per_kind():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = M.llama(layers=3, d=32, heads=4, kv_heads=2, ff=48)
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    target = fastprox.SparsityTarget(kept=0.5, by_step=8, uniform=True)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=1e-2, target=target)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    for _ in range(10):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    alive = {n: int(t.groups.alive().sum()) for n, t in reg.coupled.items()}
    assert {v for n, v in alive.items() if n.startswith("heads")} == {1}  # of 2 KV heads
    assert {v for n, v in alive.items() if n.startswith("neurons")} == {24}
    # a kind whose layers differ in width cannot be uniform
    odd = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                        nn.Linear(32, 3))
    with pytest.raises(ValueError, match="uniform=True keeps the same width in every layer of a "
                                         "kind, but the units layers have different widths: "
                                         "\\{'2.weight': 48, '4.weight': 32\\}"):
        fastprox.Regularizer(odd, "group_lasso", 1e-3,
                             target=fastprox.SparsityTarget(kept=0.5, by_step=5, uniform=True))


def test_min_kept_is_a_floor_per_layer_and_a_floor_in_the_way_warns():
    x, y = _data()
    model = _wide()
    # one pool of the hidden units, asked for 4 of 80: the default floor keeps one per layer
    target = fastprox.SparsityTarget(kept=0.05, by_step=20, layers=("2.weight", "4.weight"))
    reg = fastprox.Regularizer(model, "group_lasso", lam=1e-1, target=target)
    opt = _optimizer("adamw", model)
    reg.attach(opt)
    for _ in range(20):
        _step(model, opt, x, y)
    dead = _plain_dead(model, ["2.weight", "4.weight"])
    assert dead["2.weight"] + dead["4.weight"] == 76
    assert dead["2.weight"] <= 47 and dead["4.weight"] <= 31
    # a floor above the target: said at once, and the pool stops at the floor
    model = _wide()
    with pytest.warns(UserWarning, match="pool 'units': min_kept=0.25 keeps at least 20 of 80 "
                                         "groups, more than the 4 asked"):
        reg = fastprox.Regularizer(model, "group_lasso", lam=1e-1, target=fastprox.SparsityTarget(
            kept=0.05, by_step=20, layers=("2.weight", "4.weight"), min_kept=0.25))
    opt = _optimizer("adamw", model)
    reg.attach(opt)
    with pytest.warns(UserWarning, match="pool 'units': reached 0.2500 at step 20, not 0.05"):
        for _ in range(20):
            _step(model, opt, x, y)
    dead = _plain_dead(model, ["2.weight", "4.weight"])
    assert dead == {"2.weight": 36, "4.weight": 24}


def test_groups_zero_before_the_step_warn_that_the_pool_is_ahead():
    """Groups that were zero before the step have no value to go back to: the pool is ahead
    of its schedule, and a warning says so at that step."""
    model = _wide()
    with torch.no_grad():
        model[2].weight[:, :30] = 0
    reg = fastprox.Regularizer(model, "group_lasso", lam=1e-3, target=fastprox.SparsityTarget(
        kept=0.5, by_step=20, layers=("2.weight",)))
    with pytest.warns(UserWarning, match="pool 'units': 30 groups were zero before the proximal "
                                         "step of step 1"):
        reg.prox_step(lr=0.1)
    assert _plain_dead(model, ["2.weight"])["2.weight"] == 30


def test_hold_false_keeps_the_target_and_the_strength_after_by_step():
    x, y = _data()
    model, reg, opt = _attached(fastprox.SparsityTarget(kept=0.5, by_step=10, hold=False), 1e-2)
    for _ in range(25):
        _step(model, opt, x, y)
        dead = _plain_dead(model, ["0.weight", "2.weight", "4.weight"])
        assert dead["0.weight"] <= 6 and dead["2.weight"] + dead["4.weight"] <= 40
    assert dead["0.weight"] == 6 and dead["2.weight"] + dead["4.weight"] == 40
    assert reg.controller.held is None
    assert reg.controller.reached == {"features": 0.5, "units": 0.5}  # at by_step
    assert reg.targets["2.weight"].lam_group > 0


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_params_and_flops_of_a_sequential_match_the_compacted_model(measure):
    x, y = _data()
    model, reg, opt = _attached(fastprox.SparsityTarget(kept=0.4, by_step=30, measure=measure),
                                1e-3)
    for _ in range(32):
        _step(model, opt, x, y)
    (pool,) = reg.controller.pools
    reached = reg.controller.reached["all"]
    small = fastprox.compact(model).model
    dense = pool.total
    if measure == "params":
        left = sum(m.weight.numel() + m.bias.numel() for m in small if isinstance(m, nn.Linear))
    else:
        left = 2 * sum(m.weight.numel() for m in small if isinstance(m, nn.Linear))
    assert left / dense == pytest.approx(reached)
    # within one group of the target: the costliest group removal is at most this
    unit = 2 * (48 + 32) if measure == "flops" else 48 + 32 + 1
    assert abs(left - 0.4 * dense) <= unit


def _coupled_case(name):
    """(model, presets, example input, loss) of a tiny GPT-2 (heads, neurons) or the demo's
    ResNet (channel sets; a conv between two of them is a member of both)."""
    torch.manual_seed(0)
    if name in ("gpt2", "llama"):
        pytest.importorskip("transformers")
        model = M.gpt2(layers=2, d=32, heads=4) if name == "gpt2" else \
            M.llama(layers=2, d=32, heads=4, kv_heads=2, ff=48)
        x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        return model, ("heads", "neurons"), x, lambda: model(x, labels=x).loss
    pytest.importorskip("torch_pruning")
    from fastprox.demo.experiments import digits_resnet

    model = digits_resnet()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    return model, "channels", x, lambda: nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet"])
@pytest.mark.parametrize("measure", ["params", "flops"])
def test_coupled_costs_are_what_the_compacted_model_lost(measure, name):
    """Per-group params (n_g) and FLOPs (flop counter on the example input) of GPT-2's and
    Llama's (GQA) heads and neurons and of a ResNet's channels (elements two sets both hold counted once): what
    the target counts removed is what compaction removes."""
    model, presets, x, loss = _coupled_case(name)
    target = fastprox.SparsityTarget(kept=0.5, by_step=6, measure=measure, example_input=x)
    reg = fastprox.Regularizer(model, presets, lam=1e-3, target=target,
                               **({"example_inputs": x[:1]} if name == "resnet" else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg.attach(opt)
    dense_model = copy.deepcopy(model)
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    pools = {p.name: p for p in reg.controller.pools}
    assert set(pools) == ({"channels"} if name == "resnet" else {"heads", "neurons"})
    removed = sum((1 - reg.controller.reached[n]) * p.total for n, p in pools.items())
    assert removed > 0
    small = fastprox.compact(model, reg).model
    if measure == "params":
        lost = sum(p.numel() for p in dense_model.parameters()) - \
            sum(p.numel() for p in small.parameters())
    else:
        lost = fastprox.stats.count_flops(dense_model, x) - fastprox.stats.count_flops(small, x)
    assert lost == pytest.approx(removed, rel=1e-9)
    for pool_name, p in pools.items():  # each pool within one group's cost of half its cost
        costs = [layer.cost() for layer in (reg.controller.layers[i] for i in p.members)]
        assert abs(reg.controller.reached[pool_name] * p.total - 0.5 * p.total) <= \
            max(float(c.max()) for c in costs)


def _resumed(build, train, steps: int, stop: int):
    """(straight, resumed): ``build() -> (model, reg, opt)`` trained ``steps`` steps straight,
    and trained ``stop`` steps, saved (model, optimizer, regularizer) through torch.save, loaded
    into a fresh build and trained the rest."""
    straight = build()
    train(straight, steps)
    first = build()
    train(first, stop)
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[2].state_dict(),
                "reg": first[1].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    again = build()
    again[0].load_state_dict(saved["model"])
    again[2].load_state_dict(saved["opt"])
    again[1].load_state_dict(saved["reg"])
    train(again, steps - stop)
    for (name, a), b in zip(straight[0].state_dict().items(), again[0].state_dict().values()):
        assert torch.equal(a, b), name
    assert again[1].controller.log_scale == straight[1].controller.log_scale
    return straight, again


@pytest.mark.parametrize("measure", ["units", "flops"])  # flops: the strengths' cost shares
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("stop", [12, 28])  # mid-ramp; after the hold
def test_resume_from_a_checkpoint_is_bitwise(optimizer, stop, measure):
    x, y = _data()

    def build():
        return _attached(fastprox.SparsityTarget(kept=0.3, by_step=20, measure=measure), 1e-2,
                         optimizer=optimizer)

    def train(built, steps):
        for _ in range(steps):
            _step(built[0], built[2], x, y)

    straight, again = _resumed(build, train, 35, stop)
    assert again[1].controller.reached == straight[1].controller.reached


@pytest.mark.parametrize("stop", [5, 14])  # mid-ramp; after the hold
def test_resume_of_coupled_heads_and_neurons_is_bitwise(stop):
    pytest.importorskip("transformers")
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        model = M.llama(layers=2, d=32, heads=4, kv_heads=2, ff=48)
        reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=1e-2,
                                   target=fastprox.SparsityTarget(kept=0.5, by_step=10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        reg.attach(opt)
        return model, reg, opt

    def train(built, steps):
        for _ in range(steps):
            built[2].zero_grad()
            built[0](x, labels=x).loss.backward()
            built[2].step()

    straight, again = _resumed(build, train, 18, stop)
    assert again[1].controller.reached == straight[1].controller.reached == \
        {"heads": 0.5, "neurons": 0.5}


def test_l0_gates_follow_the_schedule():
    x, y = _data()
    torch.manual_seed(0)
    model = fastprox.l0.add_l0_gates(_wide())
    target = fastprox.SparsityTarget(kept=0.5, by_step=40)
    gates = fastprox.l0.L0Regularizer(model, 1e-1, train_size=200, target=target)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    gates.attach(opt)
    total = sum(g.features for g in gates.gates)
    for step in range(1, 51):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + gates.penalty()).backward()
        before = [g.log_alpha.detach().clone() for g in gates.gates]
        opt.step()
        closed = total - sum(gates.units_alive())
        assert closed == _schedule(total, 0.5, 40, step), step
        # no gate is spared: the copy precedes the optimizer's step, and giving it back
        # would undo the update of the strongest gates
        strongest = [b.argmax() for b in before]
        assert all(g.log_alpha[k] != b[k] for g, b, k in zip(gates.gates, before, strongest))
    assert gates.controller.reached == {"gates": sum(gates.units_alive()) / total}
    with pytest.raises(ValueError, match="counts units"):
        fastprox.l0.L0Regularizer(model, 1e-3, 200, target=fastprox.SparsityTarget(
            kept=0.5, by_step=10, measure="flops"))


def test_bad_targets_are_refused_naming_the_field():
    for kwargs, words in ((dict(kept=0.0, by_step=10), "kept must be"),
                          (dict(kept=0.5, by_step=10, measure="bytes"), "measure must be"),
                          (dict(kept=0.5, by_step=0), "needs every >= 1 and by_step > start"),
                          (dict(kept=0.5, by_step=10, min_kept=-1), "min_kept must be"),
                          (dict(kept=0.5, by_step=10, min_kept=1.5), "min_kept must be")):
        with pytest.raises(ValueError, match="SparsityTarget: " + words):
            fastprox.SparsityTarget(**kwargs)
    with pytest.raises(TypeError, match="SparsityTarget: uniform must be a bool"):
        fastprox.SparsityTarget(kept=0.5, by_step=10, uniform=1)
    with pytest.raises(ValueError, match="target.layers names no regularized"):
        fastprox.Regularizer(_wide(), "group_lasso", 1e-3,
                             target=fastprox.SparsityTarget(kept=0.5, by_step=5, layers=("9",)))
    with pytest.raises(ValueError, match="SparsityTarget: 0.bias is not the weight of a Linear"):
        fastprox.Regularizer(_wide(), "group_lasso", 1e-3, bias_l1=1e-3,
                             target=fastprox.SparsityTarget(kept=0.5, by_step=5, measure="params",
                                                            layers=("0.weight", "0.bias")))
    for options in (dict(per_layer=True), dict(uniform=True)):
        with pytest.raises(ValueError, match="one pool: the params of the compacted model"):
            fastprox.Regularizer(_wide(), "group_lasso", 1e-3, target=fastprox.SparsityTarget(
                kept=0.5, by_step=5, measure="params", **options))


def test_flops_of_coupled_groups_need_an_example_input():
    pytest.importorskip("transformers")
    model = M.gpt2(layers=1, d=32, heads=4)
    with pytest.raises(ValueError, match="measure='flops' on coupled groups counts the model's "
                                         "FLOPs on an example input"):
        fastprox.Regularizer(model, ("heads", "neurons"), 1e-3, target=fastprox.SparsityTarget(
            kept=0.5, by_step=5, measure="flops"))


def test_state_of_another_pooling_is_refused():
    model = _wide()
    pooled = fastprox.Regularizer(model, "group_lasso", 1e-3,
                                  target=fastprox.SparsityTarget(kept=0.5, by_step=5))
    layered = fastprox.Regularizer(_wide(), "group_lasso", 1e-3, target=fastprox.SparsityTarget(
        kept=0.5, by_step=5, by_kind=False))
    with pytest.raises(ValueError, match="the saved target has by_kind=False"):
        pooled.load_state_dict(layered.state_dict())
    state = layered.state_dict()
    state["controller"]["target"]["by_kind"] = True
    with pytest.raises(ValueError, match="log_scale must be a list of 2 finite numbers \\(one "
                                         "per pool: \\['features', 'units'\\]\\)"):
        pooled.load_state_dict(state)
    state["controller"]["log_scale"] = [0.0, 0.0]
    state["controller"]["reached"] = {"all": 0.5}
    with pytest.raises(ValueError, match="reached must be None or a number per pool"):
        pooled.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled.load_state_dict(pooled.state_dict())


def test_readme_target_snippet_does_what_it_says():
    """The README's target snippet, run as written: 25 % of DIGITS's hidden units."""
    pytest.importorskip("sklearn")
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index("## Sparsity targets"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = []
    scope = {"print": lambda *a: printed.append(a)}
    exec(compile(code, "README.md", "exec"), scope)
    assert printed[0] == ({"units": 0.25},)
    model = scope["model"]
    alive = [int((m.weight.detach() != 0).any(dim=0).sum()) for m in (model[2], model[4])]
    assert sum(alive) == 15
    assert "| units | units | 15/60 | 25.0 % |" in printed[1][0]


def test_pool_kinds_follow_what_the_groups_are():
    """The first layer's columns are the model's input features; rows (a preset whose groups
    are output units) are units, whatever the layer."""
    kinds = {}
    for preset in ("group_lasso", "lasso"):
        reg = fastprox.Regularizer(_wide(), preset, lam=1e-3,
                                   target=fastprox.SparsityTarget(kept=0.5, by_step=5))
        kinds[preset] = [(layer.name, layer.kind, layer.size) for layer in reg.controller.layers]
    assert kinds["group_lasso"][0] == ("0.weight", "features", 12)
    assert kinds["lasso"][0] == ("0.weight", "units", 48)


def test_a_weight_in_two_sets_keeps_both_sets_removed_groups_zero():
    """A conv between two channel sets holds the output channels of one and the input channels
    of the other: giving back a group of one (its whole slice, from the copy) must not bring
    back the elements of a removed group of the other."""
    pytest.importorskip("torch_pruning")
    model, presets, x, _ = _coupled_case("resnet")
    reg = fastprox.Regularizer(model, presets, lam=10.0, example_inputs=x[:1],
                               target=fastprox.SparsityTarget(kept=0.5, by_step=4))
    sharing = [s for s in reg.controller._sharing if s]
    assert sharing  # the sets do share convs
    total = sum(t.groups.num_groups for t in reg.coupled.values())
    for step in range(1, 4):
        reg.prox_step(lr=1.0)  # zeroes every group; the schedule allows a few
        dead = sum(int((~t.groups.alive()).sum()) for t in reg.coupled.values())
        assert dead == _schedule(total, 0.5, 4, step), step


def test_a_cost_pool_weighs_each_layers_strength_by_its_cost_per_unit_of_norm():
    """FLOPs of 12-48-32-3: a layer's strength is the pool's scale times c / tau over the
    layers' mean (c: what one of its groups saves, tau: its groups' mean norm times sqrt(n_g)),
    counted here by hand; a units pool gives every layer the pool's scale alone."""
    x, y = _data()
    lam = 1e-3
    model, reg, opt = _attached(fastprox.SparsityTarget(kept=0.4, by_step=30, measure="flops"),
                                lam)
    for _ in range(3):
        _step(model, opt, x, y)
    ws = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    live = {n: w.norm(dim=0) != 0 for n, w in ws.items()}
    kept = {n: int(v.sum()) for n, v in live.items()}
    # a column of 0.weight (an input) saves its 48 products; one of 2.weight (a unit of the
    # first hidden layer) its 32 and the 12 of its row in 0.weight; one of 4.weight 3 + 48
    saves = {"0.weight": kept["2.weight"], "2.weight": kept["0.weight"] + kept["4.weight"],
             "4.weight": kept["2.weight"] + 3}
    raw = {n: 2 * saves[n] / float((w.norm(dim=0)[live[n]] * math.sqrt(w.shape[0])).mean())
           for n, w in ws.items()}
    mean = sum(raw.values()) / 3
    scale = math.exp(reg.controller.log_scale[0])
    for n in ws:
        assert reg.targets[n].lam_group == pytest.approx(lam * scale * raw[n] / mean, rel=1e-6), n
    assert raw["2.weight"] > raw["0.weight"]  # the costly middle layer shrinks first

    model, reg, opt = _attached(fastprox.SparsityTarget(kept=0.4, by_step=30), lam)
    for _ in range(3):
        _step(model, opt, x, y)
    for i, pool in enumerate(reg.controller.pools):
        for k in pool.members:
            name = reg.controller.layers[k].name
            assert reg.targets[name].lam_group == pytest.approx(
                lam * math.exp(reg.controller.log_scale[i]), rel=1e-12)


def test_a_group_given_back_for_min_kept_leaves_the_pool_on_schedule():
    """The step empties a layer (the floor gives one group back): the pool is then behind the
    schedule, and the weakest groups of the other layer make it up, at that same step."""
    from types import SimpleNamespace

    from fastprox.target import Controller
    from fastprox.target_layers import plain_layer

    def target(name, shape):
        return SimpleNamespace(name=name, param=torch.nn.Parameter(torch.randn(shape) + 3.0),
                               lam_l1=0.0, lam_group=1.0, lam_exclusive=0.0,
                               size_weighted=True)

    a, b = target("a", (4, 2)), target("b", (4, 6))
    with torch.no_grad():
        b.param[:, :3] *= 0.1  # its three weakest groups
    layers = [plain_layer(a, [0], "units"), plain_layer(b, [0], "units")]
    c = Controller(fastprox.SparsityTarget(kept=0.5, by_step=1), layers)
    c.before_step()
    strongest = int(a.param.detach().norm(dim=0).argmax())
    with torch.no_grad():
        a.param.zero_()  # the step removed the whole layer
    c.after_step()
    alive_a = a.param.detach().norm(dim=0) != 0
    alive_b = b.param.detach().norm(dim=0) != 0
    assert alive_a.tolist() == [i == strongest for i in range(2)]
    assert alive_b.tolist() == [False] * 3 + [True] * 3
    assert c.reached == {"units": 0.5}
