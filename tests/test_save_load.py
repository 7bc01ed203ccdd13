"""One way to compact, save and load: ``compact`` discovers the groups of a model it is handed
(with presets, or none), ``Compacted`` is called as the original model, ``fastprox.save`` /
``fastprox.load`` (and ``save_compact``) take a ``Compacted`` or its model, and
``sparsity_stats`` serves a regularizer of coupled groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastprox
import models as M
from fastprox import groups as G


def _resnet():
    return M.randomize_batchnorm(M.ResNet(M.BasicBlock, (2, 2), (8, 16))).eval()


def test_a_compacted_sequential_is_called_as_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight[:, [1, 5]] = 0  # two input features
        model[2].weight[:, :6] = 0      # six hidden units
    small = fastprox.compact(model)
    x = torch.randn(4, 12)
    assert small.kept_inputs.numel() == 10
    torch.testing.assert_close(small(x), model(x))
    flat = nn.Sequential(nn.Flatten(), *model)
    torch.testing.assert_close(fastprox.compact(flat)(x.reshape(4, 3, 4)), model(x))


def test_compact_discovers_the_groups_of_a_model_it_is_handed():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = M.gpt2(layers=2).eval()
    found = G.discover(model, ("heads", "neurons"))
    for s in found.sets:
        M.kill(s, 0.5)
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(x).logits
        for groups in (None, ("heads", "neurons"), "neurons"):
            small = fastprox.compact(model, groups)
            torch.testing.assert_close(small(x).logits, want, rtol=1e-4, atol=1e-5)
            kinds = {name.split(":")[0] for name in small.kept_units}
            assert kinds == ({"neurons"} if groups == "neurons" else {"heads", "neurons"})
    resnet = _resnet()
    with pytest.raises(TypeError, match="compact: ResNet is not an nn.Sequential .*give example_inputs"):
        fastprox.compact(resnet)
    image = torch.randn(2, 3, 16, 16)
    for s in G.channels(resnet, image).sets:
        M.kill(s, 0.5)
    small = fastprox.compact(resnet, example_inputs=image)
    assert {name.split(":")[0] for name in small.kept_units} == {"channels"}
    with torch.no_grad():
        torch.testing.assert_close(small(image), resnet(image), rtol=1e-4, atol=1e-5)


def test_save_and_load_take_a_compacted_or_its_model(tmp_path):
    resnet = _resnet()
    image = torch.randn(2, 3, 16, 16)
    found = G.channels(resnet, image)
    for s in found.sets:
        M.kill(s, 0.5)
    small = fastprox.compact(resnet, found)
    with torch.no_grad():
        want = resnet(image)
    for k, what in enumerate((small, small.model)):
        path = tmp_path / f"small{k}.pt"
        assert fastprox.save(what, path) == "compact"
        again = fastprox.load(path, _resnet).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(image), want, rtol=1e-4, atol=1e-5)
        fastprox.save_compact(again, tmp_path / f"again{k}.pt")  # a loaded model saves again
        twice = fastprox.load(tmp_path / f"again{k}.pt", _resnet).eval()
        with torch.no_grad():
            torch.testing.assert_close(twice(image), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fastprox.load: a file save_compact wrote needs build"):
        fastprox.load(tmp_path / "small0.pt")
    with pytest.raises(TypeError, match="fastprox.save: compacted must be"):
        fastprox.save({"state": 1}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="save_compact: compacted must be .*or its model"):
        fastprox.save_compact(_resnet(), tmp_path / "y.pt")  # not compacted: no plan


def test_save_and_load_of_a_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = M.llama(layers=2).eval()
    found = G.discover(model, ("heads", "neurons"))
    M.kill(found.sets[0], 0.5)  # widths that differ by layer
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(x).logits
    small = fastprox.compact(model, found)
    assert fastprox.save(small.model, tmp_path / "llama") == "remote_code"
    again = fastprox.load(tmp_path / "llama", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="its config builds the model"):
        fastprox.load(tmp_path / "llama", M.llama)


def test_sparsity_stats_of_a_coupled_regularizer_counts_every_set():
    pytest.importorskip("transformers")
    model = M.gpt2(layers=2)
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=1e-3,
                               target=fastprox.SparsityTarget(kept=0.5, by_step=10))
    M.kill(reg.found.sets[0], 0.5)
    stats = fastprox.sparsity_stats(model, reg)
    assert isinstance(stats, fastprox.CoupledStats)
    assert [s.name for s in stats.sets] == list(reg.coupled)
    assert stats.sets[0].alive == 2 and stats.sets[0].total == 4
    text = stats.to_markdown()
    assert "| heads:transformer.h.0.attn | heads | 2/4 |" in text
    assert "| heads | units | 6/8 |" in text  # the target's pools
