"""Compaction: a physically smaller copy of a model, without the units sparsity training killed.

A unit (hidden neuron, conv channel, input feature) is dead when all its outgoing weights are
zero: the weights of the next layer that read it (a column of a Linear weight, an input channel
of a conv weight; the columns of all its positions after a Flatten). Removing a dead unit, with
its row/filter in the layer that makes it and its BatchNorm entries, leaves the model's outputs
unchanged. Input features whose column in the first layer is zero are removed too: the compact
model reads ``x[:, kept_inputs]``.

Two paths:

* ``compact(model)`` on an ``nn.Sequential`` (nested ones are flattened) of Linear,
  Conv1d/2d/3d (groups=1), the BatchNorm of those layers, elementwise activations, Dropout,
  pooling, Flatten, Identity, and ``fastprox.l0.L0Gate`` modules (a unit whose test-time gate is
  exactly 0 is dead too). It also removes input features (``kept_inputs``) and units made dead
  by per-tensor presets (a zero column of the next layer).
* ``compact(model, groups)`` on any model the coupled groups of ``fastprox.groups`` cover
  (ResNets, ``nn.TransformerEncoder``, Hugging Face GPT-2 and Llama): every coupled group whose
  elements are all zero (a channel, a neuron, a head) is removed from every tensor it spans,
  through Torch-Pruning's pruning functions (channels, neurons; BatchNorm statistics included)
  or the attention module's own layout (heads: ``num_heads``, ``split_size`` fixed; an
  ``nn.MultiheadAttention`` becomes a ``fastprox.HeadPrunedAttention``). The model's inputs
  and outputs keep their size.

``save_compact`` / ``load_compact`` save a compacted model small and rebuild it with
``torch.load(weights_only=True)``; ``fastprox.save_pretrained_compact`` (fastprox/hf/export.py) writes
a Hugging Face model that stock transformers loads.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import torch
from torch import nn
from torch.nn.utils import skip_init

from . import _atomic
from ._modules import CONV as _CONV, WEIGHTED as _WEIGHTED, flatten as _flatten
from .l0 import L0Gate

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel (or element) alone: a dead channel can be dropped through them.
_CHANNELWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


@dataclasses.dataclass
class Compacted:
    """The compact model and what was kept.

    ``kept_inputs``: indices of the input features (Linear first layer) or input channels (conv
    first layer) the compact model reads: ``compact_model(x[:, kept_inputs])`` (if the model
    starts with a Flatten, they index the flattened input: ``x.flatten(1)[:, kept_inputs]``).
    ``kept_units``: per weight layer (by its name in the original model), the indices of its
    output units kept. On the coupled path: per coupled set (by its name, e.g.
    ``heads:layers.0.self_attn``; module names are the compacted model's), the indices of the
    groups kept; ``kept_inputs`` is None (inputs are never removed) and ``plan`` is what
    ``save_compact`` stores."""

    model: nn.Module
    kept_inputs: torch.Tensor | None
    kept_units: dict[str, torch.Tensor]
    plan: dict | None = None
    example_inputs: object = None

    def __call__(self, *args, **kwargs):
        """The compact model called as the original was: on the Sequential path the first
        argument (the original's input) is cut to ``kept_inputs`` first."""
        if self.kept_inputs is not None and args:
            x = args[0]
            flat = isinstance(self.model[0], nn.Flatten) if len(self.model) else False
            x = x.flatten(1)[:, self.kept_inputs.to(x.device)] if flat \
                else x.index_select(1, self.kept_inputs.to(x.device))
            args = (x, *args[1:])
        return self.model(*args, **kwargs)

    def parameters_before_after(self, original: nn.Module) -> tuple[int, int]:
        return (sum(p.numel() for p in original.parameters()),
                sum(p.numel() for p in self.model.parameters()))


def _is_gate(module) -> bool:
    return isinstance(module, L0Gate)


def _input_used(weight: torch.Tensor) -> torch.Tensor:
    """Per input unit of a layer, whether any of its outgoing weights is nonzero."""
    w = weight.detach()
    return (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1).cpu()


def _check_supported(layers) -> None:
    for name, m in layers:
        if isinstance(m, _CONV) and m.groups != 1:
            raise NotImplementedError(f"compact: {name} is a grouped conv (groups={m.groups})")
        if not isinstance(m, (nn.Linear, *_CONV, *_BATCHNORM, *_CHANNELWISE, nn.Flatten)) \
                and not _is_gate(m):
            raise NotImplementedError(
                f"compact: {name} ({type(m).__name__}) is not in the supported set: Linear, "
                "Conv1d/2d/3d, BatchNorm, elementwise activations, Dropout, pooling, Flatten, "
                "Identity, L0Gate")


def _alive_between(layers, producer: int | None, consumer: int, channels: int) -> torch.Tensor:
    """Which of the ``channels`` units flowing from layers[producer] (None: the model input) into
    layers[consumer] are alive: read by a nonzero weight of the consumer, through gates that are
    open at test time. After a Flatten, the consumer reads ``spatial`` features per channel."""
    reads = layers[consumer][1].weight.shape[1]
    spatial = reads // channels
    if spatial * channels != reads:
        raise ValueError(f"compact: {layers[consumer][0]} reads {reads} inputs, not a multiple of "
                         f"the {channels} channels before it")
    features = _input_used(layers[consumer][1].weight)  # in the consumer's input space
    channel_open = torch.ones(channels, dtype=torch.bool)
    flattened = False
    for name, m in layers[(0 if producer is None else producer + 1):consumer]:
        if isinstance(m, nn.Flatten):
            flattened = True
        elif _is_gate(m):
            open_ = m.test_gates().detach().flatten().cpu() != 0
            if flattened or spatial == 1:
                features &= open_
            else:
                channel_open &= open_
    return features.reshape(channels, spatial).any(dim=1) & channel_open


def plan(model: nn.Sequential):
    """The layers of ``model`` (nested Sequentials flattened), the kept input indices and, per
    weight layer, the indices of its output units that stay alive."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"compact: model must be an nn.Sequential, got {type(model).__name__} "
                        "(see the supported set in fastprox.compaction)")
    layers = list(_flatten(model))
    _check_supported(layers)
    weight_at = [i for i, (_, m) in enumerate(layers) if isinstance(m, _WEIGHTED)]
    if not weight_at:
        raise ValueError("compact: model has no Linear or conv layer")
    first = layers[weight_at[0]][1]
    kept_inputs = _alive_between(layers, None, weight_at[0], first.weight.shape[1])
    kept_units = {}
    for k, i in enumerate(weight_at):
        name, layer = layers[i]
        if k + 1 < len(weight_at):
            alive = _alive_between(layers, i, weight_at[k + 1], layer.weight.shape[0])
        else:  # the model's outputs all stay
            alive = torch.ones(layer.weight.shape[0], dtype=torch.bool)
        kept_units[name] = _at_least_one_channel(layer, alive).nonzero().flatten()
    kept_inputs = _at_least_one_channel(first, kept_inputs)
    return layers, kept_inputs.nonzero().flatten(), kept_units


def _at_least_one_channel(layer: nn.Module, alive: torch.Tensor) -> torch.Tensor:
    """PyTorch's convs cannot have zero channels: a conv whose channels all died keeps its first
    one. Its outgoing weights are zero (or its gate is closed), so outputs do not change."""
    if isinstance(layer, _CONV) and not alive.any() and alive.numel():
        alive = alive.clone()
        alive[0] = True
    return alive


@torch.no_grad()
def compact(model: nn.Module, groups=None, *, example_inputs=None,
            forward_fn=None) -> Compacted:
    """A new, smaller model whose outputs equal ``model``'s (the original is not modified).

    ``groups`` None on an ``nn.Sequential``: the Sequential path (see the module docstring).
    Otherwise the coupled path: ``groups`` is a ``fastprox.groups.Found``, a ``Regularizer``
    built with a coupled preset, a list of discovered ``CoupledGroups``, or presets (``"heads"``,
    ``("heads", "neurons")``, ``"channels"``: discovered here); ``groups`` None on another
    model discovers ``heads`` and ``neurons``, and ``channels`` when ``example_inputs`` are
    given. The ``channels`` sets trace the model again (``example_inputs``, ``forward_fn``:
    those of the discovery unless given). ``Compacted`` is callable as the original model.

    BatchNorm's statistics are per channel, so outputs match in train and eval mode; L0 gates
    are taken at their test-time values (compare in eval mode).

    Example::

        small = fastprox.compact(model)
        small.model(x[:, small.kept_inputs])   # == model(x)

        found = fastprox.groups.channels(resnet, x)      # or reg = Regularizer(..., "channels")
        small = fastprox.compact(resnet, found)
        small.model(x)                                     # == resnet(x)
    """
    if groups is None and not isinstance(model, nn.Sequential):
        groups = _discovered(model, None, example_inputs, forward_fn)
    elif isinstance(groups, str) or isinstance(groups, (tuple, list)) and groups \
            and all(isinstance(g, str) for g in groups):
        groups = _discovered(model, groups, example_inputs, forward_fn)
    if groups is not None:
        return _compact_coupled(model, groups, example_inputs, forward_fn)
    layers, kept_inputs, kept_units = plan(model)
    incoming = kept_inputs  # kept indices of the units flowing into the current module
    spatial = 1             # features per channel once flattened
    channels = None         # units made by the last weight layer (None: the model's input)
    out_modules = []
    for position, (name, m) in enumerate(layers):
        if isinstance(m, _WEIGHTED):
            keep_in = incoming
            if spatial > 1:  # a Linear after Flatten reads every position of a kept channel
                keep_in = (incoming[:, None] * spatial + torch.arange(spatial)).flatten()
            out_modules.append(_slice_layer(m, keep_in, kept_units[name]))
            incoming, spatial = kept_units[name], 1
            channels = m.weight.shape[0]
        elif isinstance(m, nn.Flatten):
            nxt = next(l for _, l in layers[position:] if isinstance(l, _WEIGHTED))
            # (before the first weight layer, kept_inputs index the flattened input)
            spatial = 1 if channels is None else nxt.weight.shape[1] // channels
            out_modules.append(copy.deepcopy(m))
        elif isinstance(m, _BATCHNORM):
            out_modules.append(_slice_batchnorm(m, incoming))
        elif _is_gate(m):
            keep = incoming
            if spatial > 1:
                keep = (incoming[:, None] * spatial + torch.arange(spatial)).flatten()
            out_modules.append(m.sliced(keep))
        else:
            out_modules.append(copy.deepcopy(m))
    small = nn.Sequential(*out_modules)
    small.train(model.training)
    return Compacted(small, kept_inputs, kept_units)


def _index(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().index_select(dim, idx.to(t.device)).clone()


def _slice_layer(m: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> nn.Module:
    w = _index(_index(m.weight, keep_out, 0), keep_in, 1)
    kw = dict(bias=m.bias is not None, device=w.device, dtype=w.dtype)
    # skip_init: the weights are copied in below; a Linear left with zero units warns that its
    # (skipped) initialisation is a no-op
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        if isinstance(m, nn.Linear):
            new = skip_init(nn.Linear, w.shape[1], w.shape[0], **kw)
        else:
            new = skip_init(type(m), w.shape[1], w.shape[0], m.kernel_size, stride=m.stride,
                            padding=m.padding, dilation=m.dilation,
                            padding_mode=m.padding_mode, **kw)
    new.weight.copy_(w)
    if m.bias is not None:
        new.bias.copy_(_index(m.bias, keep_out, 0))
    new.train(m.training)
    return new


def _slice_batchnorm(m, keep: torch.Tensor):
    new = copy.deepcopy(m)
    new.num_features = len(keep)
    for attr in ("weight", "bias"):
        p = getattr(m, attr)
        if p is not None:
            setattr(new, attr, nn.Parameter(_index(p, keep, 0), requires_grad=p.requires_grad))
    for attr in ("running_mean", "running_var"):
        b = getattr(m, attr)
        if b is not None:
            setattr(new, attr, _index(b, keep, 0))
    return new


# -- the coupled path ----------------------------------------------------------------------------
def _discovered(model, kinds, example_inputs, forward_fn):
    """``fastprox.groups.discover`` of ``kinds``; None: every kind the model has (heads,
    neurons, and channels when ``example_inputs`` are given), TypeError naming why each
    found nothing."""
    from . import groups as G

    if kinds is not None:
        return G.discover(model, kinds, example_inputs=example_inputs, forward_fn=forward_fn)
    found, reasons = None, []
    for kind in ("heads", "neurons", "channels"):
        if kind == "channels" and example_inputs is None:
            reasons.append("channels: they trace the model, give example_inputs")
            continue
        try:
            part = G.discover(model, kind, example_inputs=example_inputs,
                              forward_fn=forward_fn)
        except (ValueError, NotImplementedError) as exc:
            reasons.append(f"{kind}: {exc}")
            continue
        if part.sets:
            found = part if found is None else found + part
        else:
            reasons.append(f"{kind}: none found")
    if found is None:
        raise TypeError(f"compact: {type(model).__name__} is not an nn.Sequential and no "
                        f"coupled groups were found in it ({'; '.join(reasons)}); give them: "
                        "fastprox.groups.discover(...) or the Regularizer")
    return found


def _found_sets(groups) -> tuple[list, object, object]:
    """(sets, example_inputs, forward_fn) of what ``compact`` was given."""
    from .coupled import CoupledGroups
    from .groups import Found

    if isinstance(groups, Found):
        return groups.sets, groups.example_inputs, groups.forward_fn
    found = getattr(groups, "found", None)  # a Regularizer
    if isinstance(found, Found):
        return found.sets, found.example_inputs, found.forward_fn
    if isinstance(groups, CoupledGroups):
        groups = [groups]
    if isinstance(groups, (list, tuple)) and all(isinstance(g, CoupledGroups) for g in groups):
        return list(groups), None, None
    raise TypeError("compact: groups must be a fastprox.groups.Found, a Regularizer built with a "
                    f"coupled preset, or a list of CoupledGroups, got {type(groups).__name__}")


def make_plan(sets) -> dict:
    """What compaction removes, as data (``torch.load(weights_only=True)`` reads it back): per
    coupled set, its unit and the indices of the groups kept (at least one: layers cannot be
    empty; a dead group kept is all zero, so outputs do not change)."""
    out = {}
    for s in sets:
        if s.unit is None:
            raise ValueError(f"compact: {s.name or s} has no unit (it was not discovered from a "
                             "model by fastprox.groups): nothing says how to remove its groups")
        alive = s.alive()
        if not alive.any() and alive.numel():
            alive[0] = True
        out[s.name] = dict(dataclasses.asdict(s.unit), groups=s.num_groups,
                           kept=alive.nonzero().flatten())
    return out


def _compact_coupled(model, groups, example_inputs, forward_fn) -> Compacted:
    sets, found_inputs, found_forward = _found_sets(groups)
    plan_ = make_plan(sets)
    small = copy.deepcopy(model)
    apply_plan(small, plan_, example_inputs if example_inputs is not None else found_inputs,
               forward_fn or found_forward)
    inputs = example_inputs if example_inputs is not None else found_inputs
    small._fastprox_plan = (plan_, inputs)  # save_compact(small) finds what it saves
    return Compacted(small, None, {name: p["kept"] for name, p in plan_.items()}, plan_, inputs)


def apply_plan(model: nn.Module, plan_: dict, example_inputs=None, forward_fn=None) -> nn.Module:
    """Removes from ``model`` (in place) the groups ``plan_`` does not keep. Channels first (one
    dependency graph of the whole model), then neurons (one per MLP), then heads."""
    from . import groups as G

    order = {"channels": 0, "neurons": 1, "heads": 2}
    items = sorted(plan_.items(), key=lambda kv: order[kv[1]["kind"]])
    graph = None
    for name, p in items:
        dead = sorted(set(range(p["groups"])) - set(p["kept"].tolist()))
        if not dead:
            continue
        if p["kind"] == "channels":
            if graph is None:
                if example_inputs is None:
                    raise ValueError("compact: channel groups trace the model: give "
                                     "example_inputs")
                graph = G.dependency_graph(model, example_inputs, forward_fn)
            _prune_root(graph, model.get_submodule(p["root"]), dead)
        elif p["kind"] == "neurons":
            owner = model.get_submodule(p["module"]) if p["module"] else model
            mlp = G._FeedForward(owner) if p["family"] == "ffn" else owner
            param = next(mlp.parameters())
            x = torch.zeros(1, 2, G._in_features(mlp), dtype=param.dtype, device=param.device)
            _prune_root(G.dependency_graph(mlp, x), model.get_submodule(p["root"]), dead)
            if isinstance(getattr(owner, "intermediate_size", None), int):  # Llama-style MLPs
                owner.intermediate_size = p["groups"] - len(dead)
        else:
            _prune_heads(model, p["module"], p["family"], p["kept"])
    return model


def _prune_root(graph, root: nn.Module, dead: list[int]) -> None:
    pruner = graph.get_pruner_of_module(root)
    with torch.enable_grad():
        graph.get_pruning_group(root, pruner.prune_out_channels, dead).prune()


def _prune_heads(model: nn.Module, name: str, family: str, kept: torch.Tensor) -> None:
    from . import groups as G
    from ._attention import HeadPrunedAttention

    module = model.get_submodule(name)
    q, kv, hd = G.attention_layout(module, name)
    if family == "mha":
        new = HeadPrunedAttention.from_attention(module, kept)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        return
    rows = (kept[:, None] * hd + torch.arange(hd)).flatten()
    if family == "gpt2":
        split = module.split_size
        packed = torch.cat([rows, rows + split, rows + 2 * split])
        _take(module.c_attn, "weight", 1, packed)
        _take(module.c_attn, "bias", 0, packed)
        module.c_attn.nf = len(packed)
        _take(module.c_proj, "weight", 0, rows)
        module.c_proj.nx = len(rows)
        module.num_heads = len(kept)
        module.split_size = len(rows)
        module.embed_dim = module.c_proj.weight.shape[1]
        return
    rep = q // kv
    q_rows = (kept[:, None] * (hd * rep) + torch.arange(hd * rep)).flatten()
    for proj, take in (("q_proj", q_rows), ("k_proj", rows), ("v_proj", rows)):
        layer = getattr(module, proj)
        _take(layer, "weight", 0, take)
        _take(layer, "bias", 0, take)
        layer.out_features = len(take)
    _take(module.o_proj, "weight", 1, q_rows)
    module.o_proj.in_features = len(q_rows)
    for attr, value in (("num_heads", len(kept) * rep), ("num_key_value_heads", len(kept))):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def _take(module: nn.Module, pname: str, axis: int, index: torch.Tensor) -> None:
    p = getattr(module, pname, None)
    if p is None:
        return
    data = p.detach().index_select(axis, index.to(p.device)).clone()
    setattr(module, pname, nn.Parameter(data, requires_grad=p.requires_grad))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Recomputes every BatchNorm's running mean and variance from ``batches`` (an iterable of
    model inputs), as the exact average over them; leaves the model in eval mode.

    Why: a proximal step that shrinks a conv's filters every step shrinks what its BatchNorm
    sees, and the running statistics (an exponential average) lag behind; a model evaluated
    with them can lose most of its accuracy (measured on the demo's ResNet: 89 % -> 97 % after
    recalibration). Call it after training, before evaluating or compacting."""
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORM)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return model


# -- saving and reloading a compacted model -----------------------------------------------------
def save_compact(compacted: Compacted, path) -> None:
    """Saves a model compacted on the coupled path (the ``Compacted``, or its model) small: its state dict, the plan (per coupled
    set: its unit and the kept group indices, by the compacted model's module names) and the
    discovery's example inputs when they are tensors. Everything is read back by
    ``torch.load(weights_only=True)``; ``load_compact`` rebuilds the model."""
    if isinstance(compacted, nn.Module) and hasattr(compacted, "_fastprox_plan"):
        plan_, inputs = compacted._fastprox_plan  # the model of a Compacted
        compacted = Compacted(compacted, None, {}, plan_, inputs)
    if not isinstance(compacted, Compacted):
        raise TypeError(f"save_compact: compacted must be what fastprox.compact returned (a "
                        f"Compacted, or its model), got {type(compacted).__name__}")
    if compacted.plan is None:
        raise ValueError("save_compact: this model was compacted on the Sequential path; save "
                         "compacted.model with torch.save (it is a plain nn.Sequential)")
    payload = {"format": _FORMAT, "state_dict": compacted.model.state_dict(),
               "plan": compacted.plan, "example_inputs": _tensors_only(compacted)}
    if isinstance(path, (str, os.PathLike)):
        # atomic: a failed save (full disk, killed process) leaves the previous file intact
        _atomic.write_file(path, lambda f: torch.save(payload, f))
    else:  # a file object the caller owns
        torch.save(payload, path)


def _tensors_only(compacted):
    """The example inputs if they are tensors (a tensor, or a tuple/list/dict of them), else
    None (load_compact then needs them again)."""
    x = compacted.example_inputs
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t.detach().cpu() for t in x)
    if isinstance(x, dict) and all(isinstance(t, torch.Tensor) for t in x.values()):
        return {k: t.detach().cpu() for k, t in x.items()}
    return None


def load_compact(path, build, *, example_inputs=None, forward_fn=None,
                 map_location=None) -> nn.Module:
    """The model ``save_compact`` wrote: ``build()`` makes the dense model (same class and
    configuration as the one compacted, any weights), the saved plan removes the same groups,
    and the saved weights are loaded (strictly). ``example_inputs``: for channel groups, what
    the model is called with (the saved ones by default)."""
    fn = "load_compact"
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the file"
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: {where} does not exist (or is not a file)")
    try:
        saved = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as exc:  # noqa: BLE001 (truncated, empty, foreign or damaged files)
        raise ValueError(f"{fn}: {where} is not a file save_compact wrote, or it is damaged "
                         f"(torch.load failed: {type(exc).__name__}: {exc}); a truncated file "
                         "comes from a save that did not finish: use an earlier save") from exc
    state_dict, plan_ = _check_saved(saved, where)
    model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: build() must return the dense nn.Module, got "
                        f"{type(model).__name__}")
    _check_plan_fits(model, plan_, where)
    inputs = example_inputs if example_inputs is not None else saved.get("example_inputs")
    with torch.no_grad():
        apply_plan(model, plan_, inputs, forward_fn)
    model._fastprox_plan = (plan_, inputs)  # saved again as it was
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"{fn}: the weights in {where} do not fit the model build() made, "
                         f"compacted by the saved plan ({exc}); build() must make the "
                         "architecture that was compacted") from exc
    return model


_FORMAT = "fastprox.compact/1"
_KINDS = ("channels", "neurons", "heads")


def _check_saved(saved, where: str) -> tuple[dict, dict]:
    """(state_dict, plan) of what torch.load read, every entry checked."""
    fn = "load_compact"
    if not isinstance(saved, dict) or "plan" not in saved or "state_dict" not in saved:
        plain = isinstance(saved, dict) and saved and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in saved.items())
        hint = (" It holds a plain state_dict: load that with model.load_state_dict, or save "
                "with fastprox.save_compact." if plain else "")
        raise ValueError(f"{fn}: {where} is not a file save_compact wrote (no plan and "
                         f"state_dict entries).{hint}")
    if saved.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"{fn}: {where} has format {saved.get('format')!r}; this fastprox "
                         f"reads {_FORMAT!r}")
    state_dict, plan_ = saved["state_dict"], saved["plan"]
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ValueError(f"{fn}: {where}: state_dict must map names to tensors")
    if not isinstance(plan_, dict):
        raise ValueError(f"{fn}: {where}: plan must be a dict of coupled sets")
    fields = {f.name for f in dataclasses.fields(_unit_type())}
    for name, p in plan_.items():
        bad = f"{fn}: {where}: plan entry {name!r}"
        if not isinstance(p, dict) or set(p) != fields | {"groups", "kept"}:
            raise ValueError(f"{bad} must hold {sorted(fields | {'groups', 'kept'})}")
        if p["kind"] not in _KINDS or not all(isinstance(p[k], str) for k in
                                             ("module", "family", "root")):
            raise ValueError(f"{bad} has an unknown kind or layout ({p['kind']!r})")
        groups, kept = p["groups"], p["kept"]
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
            raise ValueError(f"{bad}: groups must be an int >= 0, got {groups!r}")
        if not isinstance(kept, torch.Tensor) or kept.dtype != torch.int64 or kept.dim() != 1 \
                or (kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= groups
                                      or not bool((kept[1:] > kept[:-1]).all()))):
            raise ValueError(f"{bad}: kept must be increasing int64 group indices in "
                             f"[0, {groups})")
    return state_dict, plan_


def _unit_type():
    from .groups import Unit

    return Unit


def _check_plan_fits(model: nn.Module, plan_: dict, where: str) -> None:
    """Every module the plan names is in the model build() made."""
    names = {n for n, _ in model.named_modules()}
    for name, p in plan_.items():
        for key in ("module", "root"):
            if p[key] and p[key] not in names:
                raise ValueError(f"load_compact: {where} was saved from another model: its "
                                 f"set {name!r} names the module {p[key]!r}, which the model "
                                 f"build() made ({type(model).__name__}) does not have")
