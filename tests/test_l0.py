"""Hard-concrete L0 gates: the formulas against hand-computed values, the penalty, clamping."""

import math

import pytest
import torch
from torch import nn

from fastprox.l0 import L0Gate, L0Regularizer, add_l0_gates


def test_formulas_against_hand_computed_values():
    gate = L0Gate(4)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 2.0, -3.0, math.log(100.0)]))
    # P(z != 0) = sigmoid(log_alpha - beta log(-gamma/zeta)), beta log(0.1/1.1) = -1.598604...
    shift = (2 / 3) * math.log(0.1 / 1.1)
    want_p = [1 / (1 + math.exp(-(a - shift))) for a in (0.0, 2.0, -3.0, math.log(100.0))]
    assert gate.prob_nonzero().tolist() == pytest.approx(want_p, rel=1e-6)
    assert want_p[0] == pytest.approx(0.8318, abs=1e-4)
    # test gate: clamp(sigmoid(a) * 1.2 - 0.1, 0, 1)
    want_z = [0.5, min(1.0, 1.2 / (1 + math.exp(-2.0)) - 0.1), 0.0, 1.0]
    assert gate.test_gates().tolist() == pytest.approx(want_z, abs=1e-6)
    assert want_z[1] == pytest.approx(0.956956, abs=1e-6)  # 1.2 * 0.880797 - 0.1


def test_training_samples_follow_the_hard_concrete_distribution():
    gate = L0Gate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 1.0, -1.0]))
    z = gate.sample_gates(200_000)
    assert ((z >= 0) & (z <= 1)).all()
    # P(z != 0) of the samples matches the closed form; exact 0s and 1s occur (hard concrete).
    torch.testing.assert_close((z > 0).double().mean(0), gate.prob_nonzero().double(),
                               atol=5e-3, rtol=0)
    assert (z == 0).any() and (z == 1).any()
    # Sampled per example in training, deterministic in eval.
    x = torch.ones(4, 3)
    assert not torch.equal(gate(x)[0], gate(x)[1]) or not torch.equal(gate(x), gate(x))
    gate.eval()
    assert torch.equal(gate(x), gate.test_gates().expand(4, 3))


def test_initialisation_and_clamping():
    torch.manual_seed(0)
    gate = L0Gate(10_000, droprate_init=0.2)
    assert gate.log_alpha.mean().item() == pytest.approx(math.log(0.8 / 0.2), abs=1e-3)
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)
    with torch.no_grad():
        gate.log_alpha[:2] = torch.tensor([-50.0, 50.0])
    gate.clamp_()
    assert gate.log_alpha[:2].tolist() == pytest.approx([math.log(0.01), math.log(100.0)])


def test_penalty_per_layer_matches_the_formula_and_trains():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.ReLU(), nn.Linear(5, 2))
    model = add_l0_gates(base)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "L0Gate", "ReLU", "Flatten", "L0Gate", "Linear", "ReLU", "L0Gate",
                     "Linear"]
    assert model[0] is base[0]  # layers shared, not copied
    lam, wd, n = 0.1, 5e-4, 1000
    reg = L0Regularizer(model, lam=lam, train_size=n, weight_decay=wd)
    want = 0.0
    for gate, w in ((model[1], base[0].weight.reshape(3, -1)), (model[4], base[3].weight.t()),
                    (model[7], base[5].weight.t())):
        p = gate.prob_nonzero()
        want += sum(p[j] * (lam * w.shape[1] + 0.5 * wd * (w[j] ** 2).sum()) for j in range(len(p)))
    assert reg.penalty().item() == pytest.approx(want.item() / n, rel=1e-5)
    # a CNN: the first Linear is not an input layer, so p = 0.5 (log_alpha ~ 0)
    assert model[4].log_alpha.mean().item() == pytest.approx(0.0, abs=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    reg.attach(opt)
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 2, (32,))
    start = reg.expected_l0().item()
    for _ in range(40):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + 50 * reg.penalty()).backward()
        opt.step()
    assert reg.expected_l0().item() < start
    assert all(g.log_alpha.min() >= math.log(0.01) - 1e-6 for g in reg.gates)
    assert len(reg.units_alive()) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="droprate_init"):
        L0Gate(3, droprate_init=1.0)
    with pytest.raises(ValueError, match="no L0Gate"):
        L0Regularizer(nn.Linear(2, 2), lam=1.0, train_size=10)
    with pytest.raises(ValueError, match="expected 3 units"):
        L0Gate(3)(torch.randn(2, 4))


def test_mlp_input_gates_start_at_the_input_droprate():
    torch.manual_seed(0)
    model = add_l0_gates(nn.Sequential(nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10)))
    assert model[0].log_alpha.mean().item() == pytest.approx(math.log(0.8 / 0.2), abs=0.01)
    assert model[3].log_alpha.mean().item() == pytest.approx(0.0, abs=0.01)
    assert model[0].layer is model[1] and model[3].layer is model[4]
