"""compact(): the smaller model computes what the original computes, on the kept inputs."""

import pytest
import torch
from torch import nn

import fastprox
from fastprox.l0 import L0Gate, add_l0_gates


def kill(model, layer, columns=(), rows=(), in_channels=()):
    with torch.no_grad():
        w = model[layer].weight
        for c in columns:
            w[:, c] = 0
        for c in in_channels:
            w[:, c] = 0
        for r in rows:
            w[r] = 0


def assert_same_outputs(model, small, x, kept_inputs_on_flat=False):
    want = model(x)
    xin = x.flatten(1)[:, small.kept_inputs] if kept_inputs_on_flat else x[:, small.kept_inputs]
    got = small.model(xin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mlp_with_batchnorm_dropout_and_nested_sequential(mode):
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.LeakyReLU(), nn.Dropout(0.3),
                          nn.Sequential(nn.Linear(16, 12), nn.Tanh()), nn.Linear(12, 5))
    kill(model, 0, columns=[0, 3, 7, 19])                 # 4 input features dead
    with torch.no_grad():
        model[4][0].weight[:, [1, 2, 5, 6, 8, 15]] = 0     # 6 hidden units of layer 0 dead
    kill(model, 5, columns=[0, 11])                        # 2 of the nested layer 4.0
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(64, 20)
    model.eval() if mode == "eval" else model.train()
    if mode == "train":
        model[3].p = 0.0  # dropout off so that outputs compare; BatchNorm uses batch statistics
    small = fastprox.compact(model)
    assert small.kept_inputs.tolist() == [i for i in range(20) if i not in (0, 3, 7, 19)]
    assert small.kept_units["0"].numel() == 10 and small.kept_units["4.0"].numel() == 10
    assert small.kept_units["5"].numel() == 5
    sizes = [m.weight.shape for m in small.model if isinstance(m, nn.Linear)]
    assert sizes == [(10, 16), (10, 10), (5, 10)]
    assert small.model[1].num_features == 10
    assert_same_outputs(model, small, x)
    before, after = small.parameters_before_after(model)
    assert after < before


def test_cnn_input_channels_flatten_and_pooling():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 4))
    kill(model, 0, in_channels=[1])                        # input channel 1 dead
    kill(model, 4, in_channels=[0, 2, 5])                  # 3 channels of conv 0 dead
    with torch.no_grad():
        model[7].weight.view(7, 6, 4)[:, 3] = 0            # channel 3 of conv 4, all positions
        model[7].weight[:, 0] = 0                          # one position of channel 0 only: kept
    model.eval()
    small = fastprox.compact(model)
    assert small.kept_inputs.tolist() == [0, 2]
    assert small.kept_units["0"].tolist() == [1, 3, 4, 6, 7]
    assert small.kept_units["4"].tolist() == [0, 1, 2, 4, 5]
    assert small.model[7].weight.shape == (7, 5 * 4)
    assert_same_outputs(model, small, torch.randn(10, 3, 8, 8))


def test_conv1d_and_a_layer_with_nothing_left():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    kill(model, 6, columns=[0, 1, 2])  # nothing reaches the output: the output is the bias
    small = fastprox.compact(model)
    assert small.kept_units["4"].numel() == 0
    assert_same_outputs(model, small, torch.randn(5, 2, 9))


def test_convs_whose_channels_all_died_keep_one():
    # torch's convs cannot have zero channels: the compact model keeps one dead channel, whose
    # outgoing weights are zero, so it still runs and computes the same
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    kill(model, 0, in_channels=[0, 1])     # no input channel is read
    kill(model, 2, in_channels=[0, 1, 2, 3])  # no channel of conv 0 is read
    kill(model, 5, columns=range(12))      # no channel of conv 2 is read
    model.eval()
    small = fastprox.compact(model)
    assert small.kept_inputs.tolist() == [0]
    assert small.kept_units["0"].tolist() == [0]
    assert small.kept_units["2"].tolist() == [0]
    assert small.model[0].weight.shape == (1, 1, 3, 3)
    assert small.model[5].weight.shape == (2, 4)
    assert_same_outputs(model, small, torch.randn(3, 2, 4, 4))


def test_l0_gates_closed_at_test_time_are_removed():
    torch.manual_seed(0)
    model = add_l0_gates(nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(5 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3)))
    gates = [m for m in model if isinstance(m, L0Gate)]
    with torch.no_grad():
        gates[0].log_alpha[[1, 3]] = -10.0     # conv channels 1, 3 closed
        gates[1].log_alpha[:16] = -10.0        # the flattened features of channel 0
        gates[2].log_alpha[[2]] = -10.0        # hidden unit 2
    model.eval()
    small = fastprox.compact(model)
    assert small.kept_units["0"].tolist() == [2, 4]
    assert small.kept_units["5"].tolist() == [0, 1, 3, 4, 5]
    assert_same_outputs(model, small, torch.randn(7, 2, 6, 6))


def test_unsupported_models_raise():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="Net is not an nn.Sequential and no coupled groups were found"):
        fastprox.compact(Net())
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        fastprox.compact(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(NotImplementedError, match="grouped conv"):
        fastprox.compact(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


def test_trained_with_group_lasso_then_compacted():
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(),
                          nn.Linear(10, 3))
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    x, y = torch.randn(128, 30), torch.randint(0, 3, (128,))
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    small = fastprox.compact(model)
    assert len(small.kept_inputs) < 30
    assert_same_outputs(model, small, x)
