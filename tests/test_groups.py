"""Coupled groups discovered from real models (fastprox.groups), the Regularizer's coupled
presets, compaction of general graphs, and saving / reloading the small model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastprox
from fastprox import groups as G

import models as M

pytest.importorskip("torch_pruning")

RESNETS = {"basic": lambda: M.ResNet(M.BasicBlock, (2, 2), (8, 16)),
           "bottleneck": lambda: M.ResNet(M.Bottleneck, (2, 2), (4, 8))}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _names(coupled):
    return {m.name.split("[")[0] for m in coupled.slices}


# -- discovery ----------------------------------------------------------------------------------
def test_resnet_channels_couple_the_residual_stream():
    model = RESNETS["basic"]()
    found = G.channels(model, torch.randn(1, 3, 16, 16))
    by_root = {s.unit.root: s for s in found.sets}
    stem = by_root["conv1"]  # stage 1's residual channels: every writer, reader and BatchNorm
    expected = {"conv1.weight", "bn1.weight", "bn1.bias",
                "layers.0.0.conv1.weight", "layers.0.0.conv2.weight", "layers.0.0.bn2.weight",
                "layers.0.1.conv1.weight", "layers.0.1.conv2.weight", "layers.0.1.bn2.bias",
                "layers.1.0.conv1.weight", "layers.1.0.downsample.0.weight"}
    assert expected <= _names(stem)
    axes = {m.name.split("[")[0]: m.axis for m in stem.slices}
    assert axes["layers.0.0.conv1.weight"] == 1 and axes["layers.0.0.conv2.weight"] == 0
    # stage 2's stream reaches the classifier's columns; the classifier's rows never group
    stage2 = next(s for s in found.sets if "fc.weight" in _names(s))
    assert {m.axis for m in stage2.slices if m.name.startswith("fc.")} == {1}
    assert stage2.num_groups == 16
    # a block's inner channels are a group of their own: conv1 rows, bn1, conv2 columns
    inner = by_root["layers.0.0.conv1"]
    assert _names(inner) == {"layers.0.0.conv1.weight", "layers.0.0.bn1.weight",
                             "layers.0.0.bn1.bias", "layers.0.0.conv2.weight"}
    # every parameter is in a set or listed with a reason
    covered = set().union(*(_names(s) for s in found.sets))
    listed = dict(found.skipped)
    assert set(listed) == {n for n, _ in model.named_parameters()} - covered
    assert "outputs" in listed["fc.bias"]
    # residual channels are counted once: 8 + 16 stream channels, 4 blocks' inner channels
    assert sum(s.num_groups for s in found.sets) == 8 + 16 + 8 + 8 + 16 + 16


def test_transformer_heads_and_neurons():
    model = M.encoder(d=32, heads=4, ff=64)
    found = G.discover(model, ("heads", "neurons"))
    heads = [s for s in found.sets if s.unit.kind == "heads"]
    neurons = [s for s in found.sets if s.unit.kind == "neurons"]
    assert len(heads) == 2 and all(s.num_groups == 4 for s in heads)
    assert len(neurons) == 2 and all(s.num_groups == 64 for s in neurons)
    h = heads[0]
    # a head: 8 rows each of q, k, v (+ bias) and 8 columns of the output projection
    assert h.sizes.tolist() == [3 * 8 * 32 + 3 * 8 + 8 * 32] * 4
    n = neurons[0]
    assert _names(n) == {"layers.0.linear1.weight", "layers.0.linear1.bias",
                         "layers.0.linear2.weight"}
    assert n.sizes.tolist() == [32 + 1 + 32] * 64
    assert "layers.0.norm1.weight" in dict(found.skipped)


def test_gpt2_conv1d_layout_and_llama_grouped_query_heads():
    pytest.importorskip("transformers")
    gpt = M.gpt2(layers=1, d=32, heads=4)
    found = G.discover(gpt, ("heads", "neurons"))
    head = next(s for s in found.sets if s.unit.kind == "heads")
    axes = {m.name.split("[")[0]: m.axis for m in head.slices}
    assert axes == {"transformer.h.0.attn.c_attn.weight": 1, "transformer.h.0.attn.c_attn.bias": 0,
                    "transformer.h.0.attn.c_proj.weight": 0}  # Conv1D stores (in, out)
    mlp = next(s for s in found.sets if s.unit.kind == "neurons")
    assert {m.name.split("[")[0]: m.axis for m in mlp.slices}["transformer.h.0.mlp.c_fc.weight"] \
        == 1 and mlp.num_groups == 128
    llama = M.llama(layers=1, d=32, heads=4, kv_heads=2, ff=48)
    found = G.discover(llama, ("heads", "neurons"))
    head = next(s for s in found.sets if s.unit.kind == "heads")
    assert head.num_groups == 2  # one group per KV head, with its 2 query heads
    hd = 8
    per_group = 2 * hd * 32 + hd * 32 + hd * 32 + 2 * hd * 32  # q (2 heads), k, v, o columns
    assert head.sizes.tolist() == [per_group, per_group]
    mlp = next(s for s in found.sets if s.unit.kind == "neurons")
    assert _names(mlp) == {"model.layers.0.mlp.gate_proj.weight",
                           "model.layers.0.mlp.up_proj.weight",
                           "model.layers.0.mlp.down_proj.weight"}


def test_discovery_errors_name_the_module():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Parameter(torch.randn(12, 4))

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 4), Attention())
    with pytest.raises(NotImplementedError, match="heads: 1 \\(Attention\\)"):
        G.heads(model)
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(NotImplementedError, match="grouped conv"):
        G.channels(grouped, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="no transformer MLP"):
        G.neurons(nn.Sequential(nn.Linear(3, 3)))


# -- compaction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(RESNETS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compact_resnet(kind, mode):
    model = M.randomize_batchnorm(RESNETS[kind]())
    x = torch.randn(4, 3, 16, 16)
    found = G.channels(model, x[:1])
    for s in found.sets:
        M.kill(s, 0.5)
    getattr(model, mode)()
    small = fastprox.compact(model, found)
    getattr(small.model, mode)()
    with torch.no_grad():
        torch.testing.assert_close(small.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert _params(small.model) < 0.6 * _params(model)
    for s in found.sets:  # kept indices: the live groups of each set
        assert small.kept_units[s.name].tolist() == s.alive().nonzero().flatten().tolist()
    assert small.model.conv1.out_channels == len(small.kept_units["channels:conv1"])


def _zero_fraction_outputs(model, call, x, sets):
    for s in sets:
        M.kill(s, 0.5)
    with torch.no_grad():
        return call(model, x)


TRANSFORMERS = {
    "encoder": (M.encoder, lambda m, x: m(x), lambda: torch.randn(2, 5, 32)),
    "gpt2": (M.gpt2, lambda m, x: m(x).logits, lambda: torch.randint(0, 64, (2, 5))),
    "llama": (M.llama, lambda m, x: m(x).logits, lambda: torch.randint(0, 64, (2, 5))),
}


def _transformer_with_dead_units(name):
    """(build, call, x, model, found, outputs): a model with half its heads and neurons zeroed,
    its sets, and its outputs on x."""
    if name != "encoder":
        pytest.importorskip("transformers")
    build, call, inputs = TRANSFORMERS[name]
    model = build().eval()
    x = inputs()
    found = G.discover(model, ("heads", "neurons"))
    return build, call, x, model, found, _zero_fraction_outputs(model, call, x, found.sets)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_compact_transformers(name):
    build, call, x, model, found, expected = _transformer_with_dead_units(name)
    small = fastprox.compact(model, found)
    with torch.no_grad():
        torch.testing.assert_close(call(small.model.eval(), x), expected, rtol=1e-4, atol=1e-5)
    assert _params(small.model) < 0.75 * _params(model)
    # every dense layer says its new sizes (Conv1D: nf outputs, nx inputs; Linear)
    for module in small.model.modules():
        if type(module).__name__ == "Conv1D":
            assert (module.nx, module.nf) == tuple(module.weight.shape), module
        elif isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    heads = [s for s in found.sets if s.unit.kind == "heads"]
    for s in heads:
        module = small.model.get_submodule(s.unit.module)
        q, kv, _ = G.attention_layout(module, s.unit.module)
        assert kv == len(small.kept_units[s.name])
    if name == "encoder":
        assert isinstance(small.model.layers[0].self_attn, fastprox.HeadPrunedAttention)
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[0, 3:] = True
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        with torch.no_grad():
            torch.testing.assert_close(
                small.model(x, mask=causal, src_key_padding_mask=mask),
                model(x, mask=causal, src_key_padding_mask=mask), rtol=1e-4, atol=1e-5)


def test_compact_discovers_the_groups_of_general_models():
    encoder = M.encoder().eval()
    found = G.discover(encoder, ("heads", "neurons"))
    for s in found.sets:
        M.kill(s, 0.5)
    assert set(fastprox.compact(encoder).kept_units) == {s.name for s in found.sets}
    assert set(fastprox.compact(encoder, "heads").kept_units) == \
        {s.name for s in found.sets if s.name.startswith("heads")}
    with pytest.raises(TypeError, match="groups must be"):
        fastprox.compact(encoder, groups=3)


def test_head_pruned_attention_matches_multihead_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=False).eval()
    small = fastprox.HeadPrunedAttention.from_attention(mha, torch.arange(4))
    q, k = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    mask = torch.rand(5, 7) > 0.7
    mask[:, 0] = False
    for kwargs in (dict(), dict(attn_mask=mask), dict(need_weights=False)):
        out, w = small(q, k, k, **kwargs)
        ref, rw = mha(q, k, k, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        if rw is not None:
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


# -- training with the coupled presets ----------------------------------------------------------
def test_regularizer_channels_with_adamw_then_compact():
    torch.manual_seed(0)
    model = M.randomize_batchnorm(RESNETS["basic"]())
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    # AdamW: the step in its metric, thresholds lam itself (on the gradient's scale)
    reg = fastprox.Regularizer(model, "channels", lam=1e-4, example_inputs=x[:1])
    assert len(reg.coupled) == 6 and not reg.targets
    assert dict(reg.skipped)["fc.bias"].startswith("makes the model's outputs")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    reg.attach(opt)
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    alive = {n: int(t.groups.alive().sum()) for n, t in reg.coupled.items()}
    assert 0 < sum(alive.values()) < sum(t.groups.num_groups for t in reg.coupled.values())
    model.eval()
    small = fastprox.compact(model, reg)
    with torch.no_grad():
        torch.testing.assert_close(small.model(x), model(x), rtol=1e-4, atol=1e-5)
    assert reg.penalty().item() > 0
    state = reg.state_dict()
    assert set(state["coupled"]) == set(reg.coupled)


def test_regularizer_heads_neurons_lr_per_group_must_agree():
    model = M.encoder()
    reg = fastprox.Regularizer(model, ("heads", "neurons"), lam=1e-3)
    assert {t.groups.unit.kind for t in reg.coupled.values()} == {"heads", "neurons"}
    first = model.layers[0]
    other = [p for p in model.parameters() if p is not first.linear2.weight]
    opt = torch.optim.SGD([{"params": other, "lr": 0.1},
                           {"params": [first.linear2.weight], "lr": 0.01}])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="neurons:layers.0.*different learning rates"):
        reg.prox_step(opt)
    # checked before anything is written: no set, no per-tensor target was stepped
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_regularizer_overrides_for_coupled_sets():
    model = M.encoder()
    reg = fastprox.Regularizer(model, "neurons", lam=1e-3,
                               overrides={"layers.1": {"lam_group": 0.5}})
    assert reg.coupled["neurons:layers.1"].lam_group == 0.5
    assert reg.coupled["neurons:layers.0"].lam_group == 1e-3
    with pytest.raises(ValueError, match="overrides name no coupled set"):
        fastprox.Regularizer(model, "neurons", overrides={"layers.7": {"lam_group": 0.5}})


def test_group_lasso_preset_covers_transformer_weights():
    pytest.importorskip("transformers")
    gpt = M.gpt2(layers=1)
    reg = fastprox.Regularizer(gpt, "group_lasso", lam=1e-3)
    assert reg.targets["transformer.h.0.attn.c_attn.weight"].dim == 1  # Conv1D (in, out)
    assert reg.targets["transformer.h.0.mlp.c_proj.weight"].dim == 1
    skipped = dict(reg.skipped)
    assert "transformer.wte.weight" not in skipped  # tied to lm_head, regularized there
    assert set(skipped) | {n for n, p in gpt.named_parameters()
                           if any(p is t.param for t in reg.targets.values())} \
        == {n for n, _ in gpt.named_parameters()}
    enc = M.encoder()
    reg = fastprox.Regularizer(enc, "group_lasso", lam=1e-3)
    assert reg.targets["layers.0.self_attn.in_proj_weight"].dim == 0


def test_regularizer_checks_everything_when_built():
    np = pytest.importorskip("numpy")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="exclude names no module or parameter.*'7'"):
        fastprox.Regularizer(model, "group_lasso", exclude=["7"])
    with pytest.raises(ValueError, match="Regularizer: 0.weight: dim 3 is out of range"):
        fastprox.Regularizer(model, "group_lasso", overrides={"0": {"dim": 3}})
    reg = fastprox.Regularizer(model, "group_lasso", lam=np.float32(0.01),
                               overrides={"2": {"lam_group": np.float64(0.02)}})
    assert reg.targets["0.weight"].lam_group == pytest.approx(0.01)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        reg.add("extra", model[0].weight, lam_group=0.1, dim=2)
    reg = fastprox.Regularizer(model, "group_lasso", exclude=["2"])
    assert dict(reg.skipped)["2.weight"] == "excluded"
    assert "bias_l1" in dict(reg.skipped)["0.bias"]


# -- saving small -------------------------------------------------------------------------------
def test_save_and_reload_resnet(tmp_path):
    model = M.randomize_batchnorm(RESNETS["bottleneck"]()).eval()
    x = torch.randn(2, 3, 16, 16)
    found = G.channels(model, x[:1])
    for s in found.sets:
        M.kill(s, 0.5)
    small = fastprox.compact(model, found)
    path = tmp_path / "small.pt"
    fastprox.save_compact(small, path)
    torch.load(path, weights_only=True)  # plain data
    again = fastprox.load_compact(path, lambda: RESNETS["bottleneck"]()).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-5)
    assert _params(again) == _params(small.model)


@pytest.mark.parametrize("name", ["encoder", "gpt2"])
def test_save_and_reload_transformers(name, tmp_path):
    build, call, x, model, found, expected = _transformer_with_dead_units(name)
    path = tmp_path / "small.pt"
    fastprox.save_compact(fastprox.compact(model, found), path)
    again = fastprox.load_compact(path, build).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(again, x), expected, rtol=1e-4, atol=1e-5)


def _kill_uniform(found, fraction=0.5):
    """The same groups dead in every layer (uniform layers)."""
    with torch.no_grad():
        for s in found.sets:
            dead = torch.arange(max(1, int(s.num_groups * fraction)))
            for m in s.slices:
                positions = torch.isin(m.index, dead).nonzero().flatten()
                m.tensor.index_fill_(m.axis, positions, 0)


def test_save_pretrained_uniform_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = M.llama(layers=2, heads=4, kv_heads=2, ff=48).eval()
    x = torch.randint(0, 64, (2, 5))
    found = G.discover(model, ("heads", "neurons"))
    _kill_uniform(found)
    with torch.no_grad():
        expected = model(x).logits
    small = fastprox.compact(model, found).model
    fastprox.save_pretrained_compact(small, tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert again.config.num_key_value_heads == 1 and again.config.intermediate_size == 24
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_save_pretrained_of_layers_a_config_cannot_say_writes_the_modeling_file(tmp_path):
    """Widths that differ by layer, and GPT-2 with heads removed (its config derives the head
    size from n_embd / n_head): the per-module form (loaded in tests/test_hf.py)."""
    pytest.importorskip("transformers")
    model = M.llama(layers=2).eval()
    found = G.discover(model, "neurons")
    M.kill(found.sets[0], 0.5)  # only the first layer loses neurons
    small = fastprox.compact(model, found).model
    assert fastprox.save_pretrained_compact(small, tmp_path / "x") == "remote_code"
    assert (tmp_path / "x" / "modeling_pruned.py").is_file()
    gpt = M.gpt2(layers=1).eval()
    found = G.discover(gpt, "heads")
    _kill_uniform(found)
    small = fastprox.compact(gpt, found)
    assert fastprox.save_pretrained_compact(small, tmp_path / "y") == "remote_code"


# -- statistics ---------------------------------------------------------------------------------
def test_coupled_stats_count_units_once_and_measure():
    from torch.utils.flop_counter import FlopCounterMode

    model = M.randomize_batchnorm(RESNETS["basic"]()).eval()
    x = torch.randn(2, 3, 16, 16)
    found = G.channels(model, x)
    dead = sum(len(M.kill(s, 0.5)) for s in found.sets)
    small = fastprox.compact(model, found)
    stats = fastprox.coupled_stats(found, model, small, repeats=3)
    total = sum(s.num_groups for s in found.sets)
    assert stats.units() == {"channels": (total - dead, total)}
    assert total == 72  # 8 + 16 residual channels counted once, not once per reading layer
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        small.model(x)
    assert stats.flops_compact == counter.get_total_flops() < stats.flops_dense
    assert stats.params_compact < stats.params_dense
    assert stats.latency_dense_ms > 0 and stats.latency_compact_ms > 0
    assert "channels:conv1" in stats.to_markdown()
