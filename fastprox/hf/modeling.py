"""A Hugging Face causal LM whose layers were pruned to widths of their own (heads and MLP
neurons that differ by layer, or GPT-2 with heads removed, which no stock config can say).

fastprox's export (``fastprox.save_pretrained_compact``) copies this file, as
``modeling_pruned.py``, next to the weights, and names its classes in the config's
``auto_map``; the three names in capitals below are filled in then. It imports only torch and
transformers, so a process without fastprox loads the model with::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

The model is the architecture's stock class built from its dense config; then every module of
``config.pruned_modules`` is rebuilt at its saved shape (a ``Linear`` or GPT-2's ``Conv1D``),
and every attribute of ``config.pruned_attributes`` is set (head counts, split sizes), as the
pruning left them. The weights then load as ``save_pretrained`` wrote them.
"""

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

BASE_MODEL = "GPT2LMHeadModel"
BASE_CONFIG = "GPT2Config"
MODEL_TYPE = "pruned-gpt2"


class PrunedConfig(getattr(transformers, BASE_CONFIG)):
    """The architecture's config, with the shapes and attributes the pruning changed."""

    model_type = MODEL_TYPE

    def __init__(self, pruned_modules=None, pruned_attributes=None, **kwargs):
        self.pruned_modules = dict(pruned_modules or {})
        self.pruned_attributes = dict(pruned_attributes or {})
        super().__init__(**kwargs)


def _rebuilt(spec, old):
    """A module of ``spec`` ({"type", "shape": the weight's, "bias"}) on ``old``'s device and
    dtype."""
    out_or_nx, in_or_nf = spec["shape"]
    weight = old.weight
    if spec["type"] == "Linear":
        new = nn.Linear(in_or_nf, out_or_nx, bias=spec["bias"], device=weight.device,
                        dtype=weight.dtype)
    elif spec["type"] == "Conv1D":  # weight (nx, nf): Conv1D(nf, nx)
        new = Conv1D(in_or_nf, out_or_nx).to(device=weight.device, dtype=weight.dtype)
    else:
        raise ValueError(f"modeling_pruned: unknown module type {spec['type']!r}")
    return new


class PrunedForCausalLM(getattr(transformers, BASE_MODEL)):
    """The stock model, each pruned module at its own shape."""

    config_class = PrunedConfig

    def __init__(self, config):
        super().__init__(config)
        with torch.no_grad():
            for name, spec in config.pruned_modules.items():
                parent, _, leaf = name.rpartition(".")
                owner = self.get_submodule(parent) if parent else self
                setattr(owner, leaf, _rebuilt(spec, getattr(owner, leaf)))
        for name, values in config.pruned_attributes.items():
            module = self.get_submodule(name) if name else self
            for key, value in values.items():
                setattr(module, key, value)
