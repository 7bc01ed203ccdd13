"""Hugging Face models: a compacted model exported so that stock transformers loads it.

``save_pretrained_compact(model, directory)`` (``model`` a compacted Hugging Face model, or the
``Compacted`` that ``fastprox.compact`` returned) writes one of two forms, and returns which:

* ``"config"``: the architecture's own config can say the new shapes (the same MLP width and
  head counts in every layer, the head size kept; not GPT-2 with heads removed, whose config
  derives the head size from ``n_embd / n_head``): ``save_pretrained`` with the config updated
  (``intermediate_size`` / ``n_inner``, ``num_attention_heads``, ``num_key_value_heads``),
  loaded by ``AutoModelForCausalLM.from_pretrained(directory)``;
* ``"remote_code"``: otherwise (widths that differ by layer; GPT-2 with heads removed), the
  convention of heterogeneous pruned models on the Hub: the config holds the shape of every
  module the pruning changed and the attributes it set, and names a modeling file written
  beside the weights (``modeling_pruned.py``, from ``fastprox/hf/modeling.py``, which imports
  only torch and transformers) in its ``auto_map``: loaded by
  ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``.

Which one is decided by building the architecture on the meta device (no memory) and comparing
every parameter's shape and every changed attribute with the compacted model's; the remote
form is built the same way from the file it writes and checked before anything is written. A
model that neither can rebuild (a module replaced by another class, a shape changed outside a
``Linear`` / ``Conv1D``) is refused before a file is written, naming the module.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .. import _atomic

MODELING_FILE = "modeling_pruned.py"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling.py")
_FN = "save_pretrained_compact"


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _skeleton(cls, config) -> nn.Module:
    """``cls(config)`` on the meta device: shapes without memory."""
    with torch.device("meta"):
        return cls(copy.deepcopy(config))


def _int_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if type(v) is int}


def _differences(model: nn.Module, dense: nn.Module) -> tuple[dict, dict]:
    """(modules, attributes) where ``model`` differs from the ``dense`` skeleton: per module
    whose weight changed shape, its type, weight shape and bias; per other module, its int
    attributes that changed. ValueError naming the module when a change is of another kind."""
    conv1d = _conv1d()
    modules, attributes = {}, {}
    dense_modules = dict(dense.named_modules())
    for name, m in model.named_modules():
        d = dense_modules.get(name)
        if d is None or type(d) is not type(m) and not (name == "" and isinstance(d, type(m))):
            raise ValueError(
                f"{_FN}: {name or 'the model'} is a {type(m).__name__} where the architecture "
                f"has {type(d).__name__ if d is not None else 'nothing'}; only Linear / Conv1D "
                "shapes and attributes can be exported: use fastprox.save_compact")
        shapes = {n: tuple(t.shape) for n, t in m.named_parameters(recurse=False)}
        shapes |= {n: tuple(t.shape) for n, t in m.named_buffers(recurse=False)}
        dense_shapes = {n: tuple(t.shape) for n, t in d.named_parameters(recurse=False)}
        dense_shapes |= {n: tuple(t.shape) for n, t in d.named_buffers(recurse=False)}
        if set(shapes) != set(dense_shapes):
            raise ValueError(f"{_FN}: {name} holds {sorted(shapes)} where the architecture "
                             f"has {sorted(dense_shapes)}: use fastprox.save_compact")
        if shapes != dense_shapes:
            if type(m) not in (nn.Linear, conv1d):
                raise ValueError(f"{_FN}: {name} ({type(m).__name__}) changed shape "
                                 f"({dense_shapes} -> {shapes}); only Linear / Conv1D modules "
                                 "can be rebuilt at another shape: use fastprox.save_compact")
            modules[name] = {"type": type(m).__name__, "shape": list(m.weight.shape),
                             "bias": m.bias is not None}
            continue
        if isinstance(m, (nn.Linear, conv1d)):  # their sizes are the weight's shape
            continue
        mine, theirs = _int_attributes(m), _int_attributes(d)
        changed = {k: v for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            attributes[name] = changed
    return modules, attributes


def _uniform_config(model: nn.Module):
    """The model's config updated to its shapes when every layer has the same MLP width and
    head counts; None when they differ."""
    from .. import groups as G

    config = model.config
    widths, heads = {}, {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("MLP"):
            dense = [c for c in module.children() if isinstance(c, G._dense_types())]
            widths[name] = dense[0].weight.shape[G._out_axis(dense[0])]
        if G._attention_family(module) is not None:
            heads[name] = G.attention_layout(module, name)
    if len(set(widths.values())) > 1 or len(set(heads.values())) > 1:
        return None
    config = copy.deepcopy(config)
    if widths:
        width = next(iter(widths.values()))
        for attr in ("intermediate_size", "n_inner"):
            if hasattr(config, attr):
                setattr(config, attr, width)
    if heads:
        q, kv, hd = next(iter(heads.values()))
        if config.model_type == "gpt2":
            if q != config.n_head:
                return None  # the head size is n_embd / n_head: the config cannot say it
        else:
            config.num_attention_heads, config.num_key_value_heads = q, kv
            config.head_dim = hd
    return config


def _modeling_source(model: nn.Module) -> tuple[str, str]:
    """(source of modeling_pruned.py for this architecture, its model_type)."""
    model_type = f"pruned-{model.config.model_type}"
    source = open(_SOURCE).read()
    for key, value in (("BASE_MODEL", type(model).__name__),
                       ("BASE_CONFIG", type(model.config).__name__),
                       ("MODEL_TYPE", model_type)):
        line = next(line for line in source.splitlines() if line.startswith(f"{key} = "))
        source = source.replace(line, f"{key} = {value!r}", 1)
    return source, model_type


def _remote_classes(source: str):
    """(PrunedConfig, PrunedForCausalLM) of the modeling file's source, as transformers will
    load them."""
    namespace = {"__name__": "modeling_pruned"}
    exec(compile(source, MODELING_FILE, "exec"), namespace)  # noqa: S102 (our own file)
    return namespace["PrunedConfig"], namespace["PrunedForCausalLM"]


def save_pretrained_compact(model, directory: str | os.PathLike) -> str:
    """Writes a compacted Hugging Face model (or a ``Compacted``) so that stock transformers
    loads it; returns ``"config"`` or ``"remote_code"`` (module docstring). Atomic: a failed
    save leaves the previous directory as it was (its other files, such as a tokenizer, are
    carried over)."""
    from ..compaction import Compacted

    if isinstance(model, Compacted):
        model = model.model
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None \
            or not hasattr(model, "save_pretrained"):
        raise TypeError(f"{_FN}: {type(model).__name__} is not a Hugging Face model (or a "
                        "Compacted of one)")
    modules, attributes = _differences(model, _skeleton(type(model), config))
    if not modules and not attributes:
        _atomic.write_directory(directory, model.save_pretrained)
        return "config"
    uniform = _uniform_config(model)
    if uniform is not None:
        again, left = _differences(model, _skeleton(type(model), uniform))
        if not again and not left:
            original = model.config
            model.config = uniform
            try:
                _atomic.write_directory(directory, model.save_pretrained)
            finally:
                model.config = original
            return "config"
    source, model_type = _modeling_source(model)
    config_cls, model_cls = _remote_classes(source)
    fields = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    pruned = config_cls(pruned_modules=modules, pruned_attributes=attributes, **fields)
    again, left = _differences(model, _skeleton(model_cls, pruned))
    if again or left:
        raise ValueError(f"{_FN}: the modeling file does not rebuild this model "
                         f"(left: {sorted(again) + sorted(left)}); use fastprox.save_compact")

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        path = os.path.join(tmp, "config.json")
        with open(path) as f:
            saved = json.load(f)
        saved.update(model_type=model_type, architectures=["PrunedForCausalLM"],
                     auto_map={"AutoConfig": "modeling_pruned.PrunedConfig",
                               "AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM"},
                     pruned_modules=modules, pruned_attributes=attributes)
        with open(path, "w") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, MODELING_FILE), "w") as f:
            f.write(source)

    _atomic.write_directory(directory, write)
    return "remote_code"
