"""Compaction: a physically smaller copy of a model, without the units sparsity training killed.

A unit (hidden neuron, conv channel, input feature) is dead when all its outgoing weights are
zero: the weights of the next layer that read it (a column of a Linear weight, an input channel
of a conv weight; the columns of all its positions after a Flatten). Removing a dead unit, with
its row/filter in the layer that makes it and its BatchNorm entries, leaves the model's outputs
unchanged. Input features whose column in the first layer is zero are removed too: the compact
model reads ``x[:, kept_inputs]``.

Supported: ``nn.Sequential`` (nested ones are flattened) of Linear, Conv1d/2d/3d (groups=1), the
BatchNorm of those layers, elementwise activations, Dropout, pooling, Flatten, Identity, and
``fastprox.l0.L0Gate`` modules (a unit whose test-time gate is exactly 0 is dead too).
Other graphs (residual blocks, attention) need a dependency graph: see ``README.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn
from torch.nn.utils import skip_init

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
    output units kept."""

    model: nn.Sequential
    kept_inputs: torch.Tensor
    kept_units: dict[str, torch.Tensor]

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
def compact(model: nn.Sequential) -> Compacted:
    """A new, smaller ``nn.Sequential`` whose outputs equal ``model``'s on the kept inputs.

    The original model is not modified. BatchNorm's statistics are per channel, so outputs match
    in train and eval mode; L0 gates are taken at their test-time values (compare in eval mode).

    Example::

        small = fastprox.compact(model)
        small.model(x[:, small.kept_inputs])   # == model(x)
    """
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
