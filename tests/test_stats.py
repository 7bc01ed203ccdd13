"""Sparsity statistics on constructed weights, the history recorder, its PNG and TensorBoard."""

import pytest
import torch
from torch import nn

import fastprox


def mlp_with_known_zeros():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.rand_like(m.weight) + 0.1)  # no accidental zeros
        model[0].weight[:, [1, 5, 6]] = 0   # 3 of 8 input features dead
        model[0].weight[2] = 0              # a zero row of layer 0 (its unit still feeds layer 2)
        model[2].weight[:, [0, 4]] = 0      # 2 of 6 hidden units dead
        model[4].weight[:, 3] = 0           # 1 of 4 hidden units dead
    return model


def test_counts_and_flops_on_constructed_weights():
    model = mlp_with_known_zeros()
    reg = fastprox.Regularizer(model, "group_lasso", lam=0.1)
    s = fastprox.sparsity_stats(model, reg)
    l0, l2, l4 = s.layers
    assert (l0.inputs_kept, l0.inputs_total, l0.outputs_kept, l0.outputs_total) == (5, 8, 4, 6)
    assert (l2.inputs_kept, l2.outputs_kept) == (4, 3)
    assert (l4.inputs_kept, l4.inputs_total, l4.outputs_kept) == (3, 4, 3)
    assert (l0.groups_alive, l0.groups_total) == (5, 8) and (l2.groups_alive, l2.groups_total) == (4, 6)
    assert l0.nonzero == 6 * 8 - 3 * 6 - (8 - 3) and l0.numel == 48
    assert s.input_features_kept == 5 and s.hidden_units_kept == 4 + 3 and s.hidden_units_total == 10
    # remaining FLOPs are those of the compacted model: 2 * in * out per Linear
    small = fastprox.compact(model)
    want = sum(2 * m.weight.numel() for m in small.model if isinstance(m, nn.Linear))
    assert s.flops_remaining == want == 2 * (5 * 4 + 4 * 3 + 3 * 3)
    assert s.flops_dense == 2 * (8 * 6 + 6 * 4 + 4 * 3)
    assert s.nonzero == sum(int((m.weight != 0).sum()) for m in model if isinstance(m, nn.Linear))
    table = s.to_markdown()
    assert "| 0 | Linear | 5/8 | 4/6 | 5/8 |" in table and table.count("\n") == len(s.layers) + 2


def test_cnn_flops_need_an_example_input():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    with torch.no_grad():
        model[0].weight[:, 1] = 0                      # input channel 1 dead
        model[3].weight.view(5, 4, 9)[:, 2] = 0        # conv channel 2 dead (all 9 positions)
    assert fastprox.sparsity_stats(model).layers[0].flops_dense is None
    s = fastprox.sparsity_stats(model, example_input=torch.randn(1, 2, 5, 5))
    conv, fc = s.layers
    assert conv.flops_dense == 2 * 4 * 2 * 9 * 9 and conv.flops_remaining == 2 * 3 * 1 * 9 * 9
    assert (fc.inputs_kept, fc.inputs_total) == (27, 36)
    assert fc.flops_remaining == 2 * 5 * 27
    small = fastprox.compact(model)
    assert small.model[0].weight.numel() * 9 * 2 == conv.flops_remaining


def test_non_sequential_models_count_their_own_zeros():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x).relu())

    net = Net()
    with torch.no_grad():
        net.a.weight[:, 0] = 0
        net.a.weight[1] = 0
    s = fastprox.sparsity_stats(net)
    assert (s.layers[0].inputs_kept, s.layers[0].outputs_kept) == (3, 2)
    assert s.layers[0].flops_remaining == 2 * 2 * 3


def test_history_png_and_tensorboard(tmp_path):
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    reg = fastprox.Regularizer(model, "group_lasso", lam=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    reg.attach(opt)
    history = fastprox.SparsityHistory(model, reg, tensorboard=str(tmp_path / "tb"))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for step in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        history.record(step, loss=loss.item())
    assert history.steps == list(range(8)) and set(history.units) == {"0", "2"}
    assert history.units["0"][-1] < 10  # units died along the way
    png = history.plot(tmp_path / "units.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"units_alive/0", "groups_alive/2", "sparsity/loss", "sparsity/nonzero"} <= set(tags)
    assert [e.value for e in events.Scalars("units_alive/0")] == history.units["0"]
