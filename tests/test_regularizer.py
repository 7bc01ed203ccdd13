"""Regularizer: presets, proximal steps after optimizer.step(), penalties, state_dict."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import fastprox
from fastprox import CGESSchedule, Regularizer


def mlp():
    return nn.Sequential(nn.Linear(12, 10), nn.LeakyReLU(), nn.Linear(10, 6), nn.LeakyReLU(),
                         nn.Linear(6, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 4))


def batch(model):
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(8, 2, 6, 6), torch.randint(0, 4, (8,))
    return torch.randn(16, 12), torch.randint(0, 3, (16,))


def functional_metric_prox(target, opt):
    """The single-tensor metric step a target's step after Adam / AdamW must equal."""
    state, group = opt.state[target.param], opt.param_groups[0]
    fastprox.foreach_metric_prox_(
        [target.param.data], [state["exp_avg_sq"]], lr=group["lr"], eps=group["eps"],
        beta2=group["betas"][1], step=state["step"], lam_l1=target.lam_l1,
        lam_group=target.lam_group, lam_exclusive=target.lam_exclusive, dim=target.dim,
        size_weighted=target.size_weighted, exact=target.exact)


def functional_prox(target, lr):
    """The single-tensor operator a target's proximal step must equal, threshold lr * lam."""
    w, d = target.param.data, target.dim
    l1, lg, le = lr * target.lam_l1, lr * target.lam_group, lr * target.lam_exclusive
    if l1 and lg:
        fastprox.sparse_group_shrink_(w, l1, lg, d, size_weighted=target.size_weighted)
    elif l1:
        fastprox.soft_threshold_(w, l1)
    elif lg and le:
        fastprox.cges_shrink_(w, lg, le, d, size_weighted=target.size_weighted, exact=target.exact)
    elif lg:
        fastprox.group_shrink_(w, lg, d, size_weighted=target.size_weighted)
    elif le:
        fastprox.exclusive_shrink_(w, le, d, exact=target.exact)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("preset", fastprox.regularizer.PRESETS)
@pytest.mark.parametrize("make_model", [mlp, cnn], ids=["mlp", "cnn"])
def test_prox_after_step_equals_functional_operator(make_model, preset, optimizer):
    model = make_model()
    twin = copy.deepcopy(model)
    reg = Regularizer(model, preset, lam=0.5)
    twin_reg = Regularizer(twin, preset, lam=0.5)
    opt, twin_opt = OPTIMIZERS[optimizer](model.parameters()), OPTIMIZERS[optimizer](twin.parameters())
    reg.attach(opt)
    x, y = batch(model)
    for _ in range(5):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        with torch.no_grad():
            for t in twin_reg.targets.values():
                if optimizer.startswith("adam"):  # Adam / AdamW: the step in their metric
                    functional_metric_prox(t, twin_opt)
                else:
                    functional_prox(t, twin_opt.param_groups[0]["lr"])
        for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), name
    assert reg.steps == 5


def test_group_lasso_removes_units_and_lr_schedule_is_followed():
    model = mlp()
    reg = Regularizer(model, "group_lasso", lam=2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    reg.attach(opt)
    x, y = batch(model)
    for step in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(0.1 * 0.1 ** (step // 2))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for name, t in reg.targets.items():  # SGD: w - lr g, then the prox with lr * lam
            want = before[name].clone().add_(grads[name], alpha=-lr)  # rounded as SGD does
            fastprox.group_shrink_(want, lr * t.lam_group, t.dim)
            assert torch.equal(t.param.detach(), want), (step, name)
        sched.step()
    zero_cols = (model[0].weight.detach().abs().sum(0) == 0).sum().item()
    assert zero_cols > 0  # lam large: whole input features removed


def test_param_groups_use_their_own_lr_and_tensor_lr():
    model = mlp()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": torch.tensor(0.02)},
                            {"params": list(model[2].parameters()) + list(model[4].parameters()),
                             "lr": 0.001}])
    reg = Regularizer(model, "group_lasso", lam=1.0)
    model_after_step = copy.deepcopy(model)
    x, y = batch(model)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        model_after_step.load_state_dict(model.state_dict())
    reg.prox_step(opt, prox="euclidean")  # thresholds lr * lam, each group's own lr
    # each group's own lr, as given: a float32 tensor for layer 0, a Python float for the others
    for layer, lr in ((0, torch.tensor(0.02)), (2, 0.001), (4, 0.001)):
        want = model_after_step[layer].weight.detach().clone()
        fastprox.group_shrink_(want, lr * 1.0, 0)
        assert torch.equal(model[layer].weight.detach(), want)


def test_attach_refuses_parameters_outside_the_optimizer_and_remove_detaches():
    model = mlp()
    reg = Regularizer(model, "group_lasso", lam=1.0)
    with pytest.raises(ValueError, match=r"\['4.weight'\] are not parameters of the optimizer"):
        reg.attach(torch.optim.SGD(list(model[0].parameters()) + list(model[2].parameters()), lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reg.attach(opt)
    handle.remove()
    opt.step()
    assert reg.steps == 0


def test_presets_groups_exclusion_overrides_and_bias_l1():
    model = cnn()
    reg = Regularizer(model, "group_lasso", lam=0.1, exclude=["5"], overrides={"2": {"lam_group": 0.3}})
    assert list(reg.targets) == ["0.weight", "2.weight"]
    assert reg.targets["0.weight"].dim == (0, 2, 3) and reg.targets["0.weight"].lam_group == 0.1
    assert reg.targets["2.weight"].lam_group == 0.3 and reg.targets["2.weight"].size_weighted
    reg = Regularizer(model, "cges", lam=1.0)
    assert [t.dim for t in reg.targets.values()] == [0, 0, 0]  # CGES: each input position
    reg = Regularizer(model, "sparse_group_lasso", lam=0.2, lam_l1=0.05, bias_l1=0.01)
    assert list(reg.targets) == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
    assert reg.targets["5.weight"].dim == 0 and reg.targets["5.weight"].lam_l1 == 0.05
    assert reg.targets["2.bias"].lam_l1 == 0.01 and reg.targets["2.bias"].kind == "lasso"
    reg = Regularizer(list(model.named_parameters()), "exclusive", lam=0.1)  # named parameters
    assert list(reg.targets) == ["0.weight", "2.weight", "5.weight"]
    with pytest.raises(ValueError, match="overrides name no regularized parameter"):
        Regularizer(model, "group_lasso", overrides={"7": {"lam_group": 1.0}})
    with pytest.raises(ValueError, match="unknown setting 'lamb'"):
        Regularizer(model, "group_lasso", overrides={"0": {"lamb": 1.0}})
    with pytest.raises(ValueError, match="kind must be one of"):
        Regularizer(model, "group_lasso", overrides={"0": {"kind": "ridge"}})


def test_overrides_of_kind_lam_and_dim():
    model = cnn()
    reg = Regularizer(model, "group_lasso", lam=0.1, overrides={
        "0": {"kind": "exclusive", "lam": 0.4},           # a module: another preset
        "2.weight": {"lam": 0.2, "dim": (1, 2, 3)},       # a parameter: strength and groups
        "5": {"kind": "lasso"}})
    t0, t2, t5 = reg.targets.values()
    assert (t0.kind, t0.lam_exclusive, t0.lam_group, t0.dim) == ("exclusive", 0.4, 0.0, 0)
    assert (t2.kind, t2.lam_group, t2.dim) == ("group_lasso", 0.2, (1, 2, 3))
    assert (t5.kind, t5.lam_l1, t5.lam_group, t5.dim) == ("lasso", 0.1, 0.0, None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reg.attach(opt)
    before = model[2].weight.detach().clone()
    opt.step()  # no grads: the step is the prox alone
    want = fastprox.group_shrink_(before, 0.5 * 0.2, (1, 2, 3))
    assert torch.equal(model[2].weight.detach(), want)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        Regularizer(model, "group_lasso", lam=-1.0)
    with pytest.raises(ValueError, match="preset must be one of"):
        Regularizer(model, "ridge")


def test_cges_schedule_is_the_published_one():
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.Conv2d(4, 4, 5), nn.Flatten(), nn.Linear(16, 8),
                          nn.Linear(8, 10), nn.Linear(10, 2))
    lam = 6e-5
    reg = Regularizer(model, "cges", lam=lam)
    glw, elw = [1, 1, 1 / 15, 1 / 144], [1, 0.5, 15, 144]
    for layer, t in enumerate(reg.targets.values()):
        if layer < 4:
            assert t.lam_group == pytest.approx(lam * (0.8 - 0.2 * layer) * glw[layer])
            assert t.lam_exclusive == pytest.approx(lam * (0.2 + 0.2 * layer) * elw[layer])
        assert not t.size_weighted and not t.exact
    last = list(reg.targets.values())[4]  # past the published four layers: clamped, scale 1
    assert last.lam_group == 0 and last.lam_exclusive == pytest.approx(lam)
    custom = CGESSchedule(mu=0.5, step=0.1, group_scales=(), exclusive_scales=())
    assert custom.weights(2) == pytest.approx((0.3, 0.7))


def test_state_dict_round_trip():
    model = mlp()
    reg = Regularizer(model, "sparse_group_lasso", lam=0.1, overrides={"2": {"lam_l1": 0.02}})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    opt.step()
    opt.step()
    buffer = io.BytesIO()
    torch.save({"reg": reg.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = Regularizer(model, "sparse_group_lasso", lam=0.5)
    assert fresh.targets["2.weight"].lam_l1 == 0.5
    fresh.load_state_dict(saved["reg"])
    assert fresh.steps == 2 and fresh.state_dict() == reg.state_dict()
    assert fresh.targets["2.weight"].lam_l1 == 0.02 and fresh.targets["0.weight"].lam_group == 0.1
    with pytest.raises(ValueError, match="targets differ"):
        Regularizer(model, "sparse_group_lasso", exclude=["4"]).load_state_dict(saved["reg"])


@pytest.mark.parametrize("preset", fastprox.regularizer.PRESETS)
def test_penalty_value_and_finite_gradient_at_zero_groups(preset):
    model = cnn()
    with torch.no_grad():
        model[0].weight[:, 1] = 0  # a zero input channel (group of group lasso)
        model[5].weight[:, :7] = 0  # zero input features (columns)
        model[2].weight.view(5, -1)[:, 3] = 0  # a zero input position (CGES's dim=0 group)
    reg = Regularizer(model, preset, lam=0.3, bias_l1=0.1)
    penalty = reg.penalty()
    want = torch.zeros((), dtype=torch.float64)
    for t in reg.targets.values():
        w = t.param.detach().double()
        dims = list(range(1, w.dim())) if t.dim is None else t.dim
        norms = torch.linalg.vector_norm(w, dim=dims)
        c = math.sqrt(w.numel() / norms.numel()) if t.size_weighted else 1.0
        want += t.lam_l1 * w.abs().sum() + t.lam_group * c * norms.sum()
        want += 0.5 * t.lam_exclusive * (w.abs().sum(dim=dims) ** 2).sum()
    assert penalty.item() == pytest.approx(want.item(), rel=1e-5)
    penalty.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.equal(model[5].weight.grad[:, :7], torch.zeros(4, 7))
    if preset in ("group_lasso", "sparse_group_lasso"):
        assert torch.equal(model[0].weight.grad[:, 1], torch.zeros(6, 3, 3))


def test_penalty_training_shrinks_groups_like_the_seeds_demo():
    """Penalty in the loss (Scardapane's code): norms of the groups fall."""
    model = mlp()
    reg = Regularizer(model, "group_lasso", lam=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    start = fastprox.group_norms(model[0].weight.detach(), 0).sum()
    x, y = batch(model)
    for _ in range(50):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
        opt.step()
    assert fastprox.group_norms(model[0].weight.detach(), 0).sum() < 0.8 * start


def test_prox_step_with_lr_and_on_a_device_without_kernels():
    model = mlp()
    reg = Regularizer(model, "cges", lam=0.5)
    twin = copy.deepcopy(model)
    reg.prox_step(lr=0.3)
    with torch.no_grad():
        for t in Regularizer(twin, "cges", lam=0.5).targets.values():
            functional_prox(t, 0.3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    meta = mlp().to("meta")
    Regularizer(meta, "group_lasso", lam=0.1).prox_step(lr=0.1)  # the meta kernel, no error
    with pytest.raises(ValueError, match="an optimizer or an lr"):
        reg.prox_step()


@pytest.mark.parametrize("preset", ["group_lasso", "sparse_group_lasso", "cges"])
def test_prox_step_compiles_fullgraph_with_a_tensor_lr(preset):
    """No backend choice in the training layer: the step is one graph, and a changing tensor lr
    does not recompile (the step counter, a Python int, is specialised once, then dynamic)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = mlp()
    twin = copy.deepcopy(model)
    reg, reg_twin = Regularizer(model, preset, lam=0.5), Regularizer(twin, preset, lam=0.5)
    counter = CompileCounter()
    step = torch.compile(lambda lr: reg.prox_step(lr=lr), fullgraph=True, backend=counter)
    for value in (0.3, 0.1, 0.2, 0.05):
        step(torch.tensor(value, dtype=torch.float64))
        reg_twin.prox_step(lr=value)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
    assert counter.frame_count <= 2
    assert reg.steps == 4
