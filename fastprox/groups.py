"""Coupled groups discovered from a model: the slices that must be removed together.

Presets, each a function ``(model, ...) -> Found``:

* ``channels(model, example_inputs)``: every channel (conv output channel, hidden unit of a
  Linear) with everything that reads or writes it, found by Torch-Pruning's
  ``DependencyGraph``: the filter of the layer that makes it, its BatchNorm / LayerNorm entries,
  the input channels of every layer that reads it. Residual channels are one group across every
  block of their stage (every conv that writes the stream, the downsample shortcut, every
  reader). The model's output units are never grouped.
* ``neurons(model)``: the hidden units of every transformer MLP (``nn.TransformerEncoderLayer``
  / ``DecoderLayer``'s feed-forward, and modules whose class name ends in ``MLP``, such as
  Hugging Face GPT-2's and Llama's): a row of the up (and gate) projection, its bias entry, a
  column of the down projection. Found by a ``DependencyGraph`` of each MLP.
* ``heads(model)``: every attention head: its rows of Q, K and V (and bias entries) and its
  columns of the output projection, for ``nn.MultiheadAttention``, Hugging Face GPT-2 attention
  (``Conv1D`` weights stored ``(in, out)``) and Llama-style attention (``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``). With grouped-query attention a group is a KV head with all the
  query heads that read it. Attention heads are not found by the dependency graph (it does not
  follow the reshapes into heads): they come from the module's own layout.

A tensor can be a member of several sets along different axes (a conv weight: its rows in its
output channels' set, its columns in its input channels' set); each set's step is applied in
turn (``Regularizer.prox_step`` steps the sets one after another).

A ``Found`` holds the ``CoupledGroups`` sets (each with its ``unit``: what it removes, for
``fastprox.compact``), and ``skipped``: every parameter of the model no set covers, with the
reason. Discovery that fails on a model raises an error naming the module.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from .coupled import CoupledGroups, Slice
from ._modules import CONV

PRESETS = ("channels", "neurons", "heads")


@dataclasses.dataclass(frozen=True)
class Unit:
    """What a coupled set removes: ``kind`` (channels, neurons, heads), ``module`` (the name of
    the layer whose output channels are the root, the MLP, or the attention module), ``family``
    (how the module is laid out: graph, ffn, mlp, mha, gpt2, llama) and ``width`` (elements of
    the root per group: the head dimension times the query heads of a KV head, 1 otherwise),
    ``root`` (the layer whose output channels index the groups, for channels and neurons)."""

    kind: str
    module: str
    family: str
    width: int = 1
    root: str = ""


@dataclasses.dataclass
class Found:
    """Coupled sets discovered from a model, and the parameters none of them covers."""

    sets: list[CoupledGroups]
    skipped: list[tuple[str, str]]
    example_inputs: object = None
    forward_fn: Callable | None = None

    def __add__(self, other: "Found") -> "Found":
        # a parameter is skipped when neither covers it (with the first one's reason)
        covered = {n for s in other.sets for n in _param_names(s)}
        skipped = [(n, r) for n, r in self.skipped if n not in covered]
        listed = {n for n, _ in skipped} | {n for s in self.sets for n in _param_names(s)}
        skipped += [(n, r) for n, r in other.skipped if n not in listed]
        return Found(self.sets + other.sets, skipped,
                     self.example_inputs if self.example_inputs is not None
                     else other.example_inputs, self.forward_fn or other.forward_fn)


def _param_names(s: CoupledGroups) -> set[str]:
    return {m.name.split("[")[0] for m in s.slices}


def _conv1d_type():
    """Hugging Face's Conv1D (GPT-2's dense layers, weight stored (in, out)), if installed."""
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    if module is None:
        try:
            from transformers import pytorch_utils as module  # noqa: F811
        except ImportError:  # pragma: no cover  (transformers is optional)
            return None
    return module.Conv1D


def _dense_types() -> tuple:
    conv1d = _conv1d_type()
    return (nn.Linear,) + ((conv1d,) if conv1d is not None else ())


def _out_axis(module) -> int:
    """The axis of a dense layer's weight that indexes its outputs (Conv1D: 1)."""
    conv1d = _conv1d_type()
    return 1 if conv1d is not None and isinstance(module, conv1d) else 0


def _members(module: nn.Module, name: str, out: bool, positions: torch.Tensor,
             groups: torch.Tensor) -> list[Slice]:
    """The slices of ``module``'s parameters at ``positions`` of its outputs (``out``) or inputs,
    position ``positions[k]`` in group ``groups[k]``."""
    conv1d = _conv1d_type()
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    found: list[tuple[str, torch.Tensor, int]] = []
    if isinstance(module, CONV):
        if module.groups != 1:
            raise NotImplementedError(
                f"fastprox.groups: {name} is a grouped conv (groups={module.groups}); its "
                "channels cannot be coupled slice by slice")
        found.append(("weight", module.weight, 0 if out else 1))
        if out and module.bias is not None:
            found.append(("bias", module.bias, 0))
    elif isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        axis = _out_axis(module)
        found.append(("weight", module.weight, axis if out else 1 - axis))
        if out and module.bias is not None:
            found.append(("bias", module.bias, 0))
    elif isinstance(module, norms):
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor):
                found.append((pname, p, 0))
    elif isinstance(module, nn.Embedding):
        found.append(("weight", module.weight, 1))
    elif isinstance(module, nn.PReLU):
        if module.weight.numel() > 1:
            found.append(("weight", module.weight, 0))
    elif any(True for _ in module.parameters(recurse=False)):
        raise NotImplementedError(
            f"fastprox.groups: {name} ({type(module).__name__}) is coupled to a group but its "
            "parameter layout is unknown; exclude it or leave its model out")
    slices = []
    for pname, tensor, axis in found:
        length = tensor.shape[axis]
        index = torch.full((length,), -1, dtype=torch.int64)
        index[positions] = groups
        covered = (index >= 0).nonzero().flatten()
        label = f"{name}.{pname}" if name else pname
        if covered.numel() == 0:
            continue
        lo, hi = int(covered[0]), int(covered[-1]) + 1
        if covered.numel() != hi - lo:
            raise NotImplementedError(
                f"fastprox.groups: {label}: the group's positions along axis {axis} are not one "
                "contiguous range")
        view = tensor.detach().narrow(axis, lo, hi - lo) if (lo, hi) != (0, length) else tensor
        suffix = f"[{axis}:{lo}:{hi}]" if (lo, hi) != (0, length) else f"[{axis}]"
        slices.append(Slice(view, axis, index[lo:hi], label + suffix))
    return slices


def _merge(slices: list[Slice]) -> list[Slice]:
    """One member per (tensor, axis): a layer listed twice in a group is one member."""
    seen: dict[tuple, Slice] = {}
    for s in slices:
        key = (s.name,)
        if key not in seen:
            seen[key] = s
    return list(seen.values())


def _skipped(model: nn.Module, sets: list[CoupledGroups], why) -> list[tuple[str, str]]:
    covered = {n for s in sets for n in _param_names(s)}
    out = []
    for pname, _ in model.named_parameters():
        if pname not in covered:
            out.append((pname, why(pname)))
    return out


def _module_of(model: nn.Module, pname: str) -> nn.Module:
    return model.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else model


# -- channels: Torch-Pruning's dependency graph ------------------------------------------------
def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover  (installed with the `models` extra)
        raise ImportError("fastprox.groups: channel discovery needs Torch-Pruning "
                          "(pip install torch-pruning, or fastprox[models])") from e
    return torch_pruning


def _customized_pruners(tp) -> dict:
    conv1d = _conv1d_type()
    if conv1d is None:
        return {}

    class Conv1DPruner(tp.pruner.BasePruningFunc):
        """Hugging Face's Conv1D: weight (in, out), bias (out)."""

        TARGET_MODULES = conv1d

        def prune_out_channels(self, layer, idxs):
            keep = _keep(layer.weight.shape[1], idxs)
            layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.data[keep].clone())
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = _keep(layer.weight.shape[0], idxs)
            layer.weight = nn.Parameter(layer.weight.data[keep].clone())
            layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return {conv1d: Conv1DPruner()}


def _keep(length: int, idxs) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(length) if i not in drop], dtype=torch.int64)


def dependency_graph(model: nn.Module, example_inputs, forward_fn=None):
    """Torch-Pruning's ``DependencyGraph`` of ``model``, traced on ``example_inputs`` (with
    Hugging Face's Conv1D known). Errors name the model's class."""
    tp = _torch_pruning()
    kwargs = dict(customized_pruners=_customized_pruners(tp), verbose=False)
    if forward_fn is not None:
        kwargs["forward_fn"] = forward_fn
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, **kwargs)
    except Exception as e:
        raise RuntimeError(f"fastprox.groups: the dependency graph of {type(model).__name__} "
                           f"could not be traced: {type(e).__name__}: {e}") from e


def _graph_sets(graph, model: nn.Module, kind: str, family: str, prefix: str = "",
                exclude: Callable[[str], bool] = lambda name: False):
    """Coupled sets from a dependency graph's groups rooted at the output channels of each layer
    (the model's output layers are never roots: their outputs stay)."""
    names = {m: (prefix + n if n else prefix.rstrip(".")) for n, m in model.named_modules()}
    roots = (*CONV, *_dense_types())
    outputs = {m for m, node in graph.module2node.items() if not node.outputs}
    sets, left_out = [], []
    for group in graph.get_all_groups(root_module_types=roots, ignored_layers=list(outputs)):
        root = group[0].dep.target.module
        root_name = names[root]
        channels = graph.get_out_channels(root)
        slices = []
        for item in group:
            module = item.dep.target.module
            if module not in names:  # a traced function (add, flatten, ...): no parameters
                continue
            out = graph.is_out_channel_pruning_fn(item.dep.handler)
            slices += _members(module, names[module], out,
                               torch.as_tensor(list(item.idxs), dtype=torch.int64),
                               torch.as_tensor(list(item.root_idxs), dtype=torch.int64))
        slices = _merge(slices)
        hit = [s.name for s in slices if exclude(s.name.split("[")[0])]
        if hit:
            left_out.append((root_name, hit))
            continue
        coupled = CoupledGroups(slices, channels, name=f"{kind}:{root_name}",
                                labels=torch.arange(channels))
        coupled.unit = Unit(kind, root_name, family, root=root_name)
        sets.append(coupled)
    return sets, outputs, names, left_out


def channels(model: nn.Module, example_inputs, *, forward_fn=None, exclude=()) -> Found:
    """Channel groups of any model the dependency graph covers (see the module docstring).
    ``example_inputs``: what ``model`` is called with for the trace (a tensor, a tuple, or a
    dict; ``forward_fn(model, example_inputs)`` when the call is another). ``exclude``: module
    or parameter names; a group that touches one is left out (and listed in ``skipped``)."""
    excluded = _excluder(exclude)
    graph = dependency_graph(model, example_inputs, forward_fn)
    sets, outputs, names, left_out = _graph_sets(graph, model, "channels", "graph",
                                                 exclude=excluded)
    output_names = {names[m] for m in outputs if m in names}
    touched = {p: root for root, hit in left_out for p in hit}

    def why(pname: str) -> str:
        mname = pname.rsplit(".", 1)[0] if "." in pname else ""
        if excluded(pname):
            return "excluded"
        for p, root in touched.items():
            if p.split("[")[0] == pname:
                return f"in the channel group of {root}, which touches an excluded name"
        if mname in output_names:
            return "makes the model's outputs (its units stay)"
        return (f"no channel group reaches it ({type(_module_of(model, pname)).__name__}: "
                "the model's input side, or a layout the graph does not cover)")

    return Found(sets, _skipped(model, sets, why), example_inputs, forward_fn)


# -- neurons: a dependency graph per transformer MLP --------------------------------------------
class _FeedForward(nn.Module):
    """nn.TransformerEncoderLayer/DecoderLayer's feed-forward block as a module of its own
    (linear1 -> activation -> dropout -> linear2), for the dependency graph."""

    def __init__(self, layer):
        super().__init__()
        self.linear1, self.linear2, self.dropout = layer.linear1, layer.linear2, layer.dropout
        self.activation = layer.activation

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def _mlps(model: nn.Module):
    """(name, module to trace, family) of every transformer MLP of ``model``."""
    dense = _dense_types()
    for name, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            yield name, _FeedForward(module), "ffn"
        elif type(module).__name__.endswith("MLP") and \
                sum(isinstance(c, dense) for c in module.children()) >= 2:
            yield name, module, "mlp"


def _in_features(module: nn.Module) -> int:
    first = next(m for m in module.modules() if isinstance(m, _dense_types()))
    return first.weight.shape[0] if _out_axis(first) == 1 else first.weight.shape[1]


def neurons(model: nn.Module, *, exclude=()) -> Found:
    """Hidden units of every transformer MLP (see the module docstring)."""
    excluded = _excluder(exclude)
    sets = []
    for name, mlp, family in _mlps(model):
        if excluded(name):
            continue
        param = next(mlp.parameters())
        x = torch.zeros(1, 2, _in_features(mlp), dtype=param.dtype, device=param.device)
        prefix = f"{name}." if name else ""
        graph = dependency_graph(mlp, x)
        found, _, _, _ = _graph_sets(graph, mlp, "neurons", family, prefix=prefix,
                                     exclude=excluded)
        for s in found:
            s.unit = Unit("neurons", name, family, root=s.unit.root)
            s.name = f"neurons:{name}" if len(found) == 1 else f"neurons:{s.unit.root}"
        sets += found
    if not sets:
        raise ValueError(f"fastprox.groups.neurons: {type(model).__name__} has no transformer "
                         "MLP (nn.TransformerEncoderLayer/DecoderLayer, or a module whose class "
                         "name ends in MLP with two dense layers)")
    return Found(sets, _skipped(model, sets, lambda p: "excluded" if excluded(p)
                                else "not in a transformer MLP's hidden units"))


# -- heads: the attention modules' own layout ---------------------------------------------------
def _attention_family(module: nn.Module) -> str | None:
    from ._attention import HeadPrunedAttention

    conv1d = _conv1d_type()
    if isinstance(module, (nn.MultiheadAttention, HeadPrunedAttention)):
        return "mha"
    if conv1d is not None and isinstance(getattr(module, "c_attn", None), conv1d) \
            and isinstance(getattr(module, "c_proj", None), conv1d):
        return "gpt2"
    if all(isinstance(getattr(module, n, None), nn.Linear)
           for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama"
    return None


def attention_layout(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of an attention module fastprox knows."""
    family = _attention_family(module)
    if family == "mha" and not isinstance(module, nn.MultiheadAttention):  # HeadPrunedAttention
        return module.num_heads, module.num_heads, module.head_dim
    if family == "mha":
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError(
                f"fastprox.groups.heads: {name}: nn.MultiheadAttention with kdim/vdim, "
                "add_bias_kv or add_zero_attn is not supported")
        return module.num_heads, module.num_heads, module.head_dim
    if family == "gpt2":
        if getattr(module, "is_cross_attention", False):
            raise NotImplementedError(f"fastprox.groups.heads: {name}: GPT-2 cross-attention "
                                      "is not supported")
        return module.num_heads, module.num_heads, module.head_dim
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError(f"fastprox.groups.heads: {name} ({type(module).__name__}) has no "
                         "int head_dim attribute")
    q = module.q_proj.out_features // head_dim
    kv = module.k_proj.out_features // head_dim
    if q * head_dim != module.q_proj.out_features or kv == 0 or q % kv:
        raise ValueError(f"fastprox.groups.heads: {name}: q_proj/k_proj widths "
                         f"{module.q_proj.out_features}/{module.k_proj.out_features} do not "
                         f"split into heads of {head_dim}")
    return q, kv, head_dim


def _head_slices(module: nn.Module, name: str) -> tuple[list[Slice], int, int]:
    """(slices, groups, width) of an attention module's heads; a group per KV head."""
    family = _attention_family(module)
    q, kv, hd = attention_layout(module, name)
    rep = q // kv
    prefix = f"{name}." if name else ""
    if family == "mha":
        inner = q * hd
        packed = (torch.arange(3 * inner) % inner) // hd
        slices = [Slice(module.in_proj_weight, 0, packed, prefix + "in_proj_weight[0]"),
                  Slice(module.out_proj.weight, 1, torch.arange(inner) // hd,
                        prefix + "out_proj.weight[1]")]
        if module.in_proj_bias is not None:
            slices.insert(1, Slice(module.in_proj_bias, 0, packed, prefix + "in_proj_bias[0]"))
        return slices, q, hd
    if family == "gpt2":
        split = module.split_size
        packed = (torch.arange(3 * split) % split) // hd
        slices = [Slice(module.c_attn.weight, 1, packed, prefix + "c_attn.weight[1]"),
                  Slice(module.c_attn.bias, 0, packed, prefix + "c_attn.bias[0]"),
                  Slice(module.c_proj.weight, 0, torch.arange(split) // hd,
                        prefix + "c_proj.weight[0]")]
        return slices, q, hd
    slices = []
    for proj, per in (("q_proj", hd * rep), ("k_proj", hd), ("v_proj", hd)):
        layer = getattr(module, proj)
        index = torch.arange(layer.out_features) // per
        slices.append(Slice(layer.weight, 0, index, f"{prefix}{proj}.weight[0]"))
        if layer.bias is not None:
            slices.append(Slice(layer.bias, 0, index, f"{prefix}{proj}.bias[0]"))
    slices.append(Slice(module.o_proj.weight, 1, torch.arange(q * hd) // (hd * rep),
                        f"{prefix}o_proj.weight[1]"))
    return slices, kv, hd * rep


def heads(model: nn.Module, *, exclude=()) -> Found:
    """Attention heads of every attention module (see the module docstring). A module whose
    class name contains "Attention" and that holds parameters, but whose layout is not one of
    the known ones, is an error naming it."""
    excluded = _excluder(exclude)
    sets, known = [], []
    for name, module in model.named_modules():
        family = _attention_family(module)
        if family is None:
            if "Attention" in type(module).__name__ and \
                    any(True for _ in module.parameters(recurse=False)) and \
                    not any(name.startswith(k + ".") for k in known):
                raise NotImplementedError(
                    f"fastprox.groups.heads: {name} ({type(module).__name__}) looks like "
                    "attention but its layout is unknown (known: nn.MultiheadAttention, GPT-2's "
                    "Conv1D attention, q_proj/k_proj/v_proj/o_proj)")
            continue
        known.append(name)
        if excluded(name):
            continue
        slices, count, width = _head_slices(module, name)
        coupled = CoupledGroups(slices, count, name=f"heads:{name}",
                                labels=torch.arange(count))
        coupled.unit = Unit("heads", name, family, width)
        sets.append(coupled)
    if not sets and not known:
        raise ValueError(f"fastprox.groups.heads: {type(model).__name__} has no attention "
                         "module fastprox knows")
    return Found(sets, _skipped(model, sets, lambda p: "excluded" if excluded(p)
                                else "not in an attention head"))


def _excluder(exclude) -> Callable[[str], bool]:
    if isinstance(exclude, str):
        exclude = (exclude,)
    keys = tuple(exclude)

    def hit(name: str) -> bool:
        return any(name == k or name.startswith(k + ".") for k in keys)

    return hit


def discover(model: nn.Module, kinds, *, example_inputs=None, forward_fn=None,
             exclude=()) -> Found:
    """The sets of several presets together (``kinds``: names of ``PRESETS``). Parameters left
    out by every preset are listed in ``skipped`` with the first preset's reason."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    found = None
    for kind in kinds:
        if kind == "channels":
            if example_inputs is None:
                raise ValueError("fastprox.groups: the channels preset traces the model: give "
                                 "example_inputs")
            part = channels(model, example_inputs, forward_fn=forward_fn, exclude=exclude)
        elif kind == "neurons":
            part = neurons(model, exclude=exclude)
        elif kind == "heads":
            part = heads(model, exclude=exclude)
        else:
            raise ValueError(f"fastprox.groups: unknown preset {kind!r} (expected one of "
                             f"{PRESETS})")
        found = part if found is None else found + part
    if found is None:
        raise ValueError("fastprox.groups: no preset given")
    return found
