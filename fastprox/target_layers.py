"""The layers a sparsity target controls (fastprox/target.py), and what their groups cost.

The layers write their tensors in place under ``torch.no_grad`` (not through ``.data``), so
that a tensor's version moves with every write: the counts of an ``nn.Sequential`` are cached
on those versions.

* ``plain_layer``: a plain target of a Regularizer, its groups along ``dims``;
* ``coupled_layer``: a coupled set, its groups over every member;
* ``coupled_costs``: per group of a coupled set, the parameters (``n_g``, every element of
  every member) or the FLOPs per example its removal saves: each weight element of a Linear /
  conv / GPT-2 ``Conv1D`` member carries its module's FLOPs (``torch.utils.flop_counter`` on an
  example input) divided by the module's weight elements; an attention module's own FLOPs (the
  score and value products, not in a child layer) are shared by its head groups equally. A
  weight in two sets along two axes (a conv between two channel sets: its output channels in
  one, its input channels in the next) has the elements of a removed group of each in both
  costs: ``overlaps`` says how many, and the controller counts them once;
* ``sequential_counts``: the plain presets on an ``nn.Sequential``: params
  and FLOPs left as ``fastprox.sparsity_stats`` counts them on the compacted model, and per
  group, what removing one more group of a layer saves now (a column of its own weight, and its
  share of the unit the layer before makes).
"""

from __future__ import annotations

import math

import torch

from . import ops
from ._modules import WEIGHTED
from .target import Layer


def _dense_types() -> tuple:
    from .groups import _dense_types as dense

    return WEIGHTED + dense()


def _broadcast(mask: torch.Tensor, weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    for d in dims:
        mask = mask.unsqueeze(d)
    return mask.to(weight.device)


def plain_layer(target, dims: list[int], kind: str, costs=None) -> Layer:
    """A plain target of a Regularizer: its groups along ``dims``."""
    base = (target.lam_l1, target.lam_group, target.lam_exclusive)
    w = target.param
    n = math.sqrt(math.prod(w.shape[d] for d in dims)) if target.size_weighted else 1.0
    size = math.prod(s for d, s in enumerate(w.shape) if d not in dims)
    buffer = []

    def measured(x):
        norms = ops.group_norms(x, tuple(dims)) if dims else x.abs()
        norms = norms.detach().reshape(-1).to("cpu", torch.float64)
        return norms != 0, norms / n

    kept = [d for d in range(w.dim()) if d not in dims]

    @torch.no_grad()
    def remove(mask):
        if len(kept) == 1:  # the groups along one dimension: only their slices are written
            w.index_fill_(kept[0], torch.nonzero(mask).flatten().to(w.device), 0)
        else:
            w.mul_(~_broadcast(mask.reshape(_kept_shape(w, dims)), w, dims))

    def scale(s):
        target.lam_l1, target.lam_group, target.lam_exclusive = (s * b for b in base)

    def save():
        if not buffer or buffer[0].shape != w.shape or buffer[0].dtype != w.dtype \
                or buffer[0].device != w.device:
            buffer[:] = [torch.empty_like(w, memory_format=torch.contiguous_format)]
        return buffer[0].copy_(w.detach())

    @torch.no_grad()
    def restore(state, mask):
        if len(kept) == 1:
            where = torch.nonzero(mask).flatten().to(w.device)
            w.index_copy_(kept[0], where, state.index_select(kept[0], where))
        else:
            keep = _broadcast(mask.reshape(_kept_shape(w, dims)), w, dims)
            w.copy_(torch.where(keep, state, w))

    return Layer(target.name, kind, size, lambda: measured(w.detach()), remove, scale, save,
                 restore, measured, costs, (w.untyped_storage().data_ptr(),), n * n)


def _kept_shape(w: torch.Tensor, dims: list[int]) -> tuple:
    return tuple(s for d, s in enumerate(w.shape) if d not in dims)


def coupled_layer(target, costs=None) -> Layer:
    """A coupled set of a Regularizer: its groups over every member."""
    base = (target.lam_l1, target.lam_group, target.lam_exclusive)
    g = target.groups
    sizes = g.sizes.to(torch.float64).clamp(min=1)
    root = sizes.sqrt() if target.size_weighted else torch.ones_like(sizes)
    buffers = []

    def measured(tensors):
        acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        parts = []  # per member, the squared norm of each slice (the fused group_norms)
        for t, dims in zip(tensors, g._dims):
            t = t.detach()
            norms = ops.group_norms(t, tuple(dims)) if dims else t.abs()
            parts.append(norms.to(acc).square())
        norms = g._totals(parts).to("cpu", torch.float64).sqrt()
        return norms != 0, norms / root

    def positions(mask, m):
        return torch.nonzero(mask[m.index]).flatten().to(m.tensor.device)

    @torch.no_grad()
    def remove(mask):
        for m in g.slices:
            m.tensor.index_fill_(m.axis, positions(mask, m), 0)

    def scale(s):
        target.lam_l1, target.lam_group, target.lam_exclusive = (s * b for b in base)

    def save():
        if len(buffers) != len(g.slices) or any(
                b.shape != m.tensor.shape or b.dtype != m.tensor.dtype
                or b.device != m.tensor.device for b, m in zip(buffers, g.slices)):
            buffers[:] = [torch.empty_like(m.tensor, memory_format=torch.contiguous_format)
                          for m in g.slices]
        return [b.copy_(m.tensor.detach()) for b, m in zip(buffers, g.slices)]

    @torch.no_grad()
    def restore(state, mask):
        for m, saved in zip(g.slices, state):
            where = positions(mask, m)
            m.tensor.index_copy_(m.axis, where, saved.index_select(m.axis, where))

    return Layer(target.name, _kind(target), g.num_groups,
                 lambda: measured([m.tensor for m in g.slices]), remove, scale, save, restore,
                 measured, costs,
                 tuple({m.tensor.untyped_storage().data_ptr() for m in g.slices}),
                 float((root * root).mean()) if len(root) else 1.0)


def _kind(target) -> str:
    unit = target.groups.unit
    return unit.kind if unit is not None else "groups"


# -- what groups cost ----------------------------------------------------------------------------

def coupled_costs(targets, model, measure: str, example_inputs=None, forward_fn=None):
    """Per coupled target, its groups' costs (float64) for ``measure``, and the overlaps of the
    sets (module docstring): ``(costs, overlaps)``."""
    per_element = {}  # id(member tensor's parameter storage) -> cost of one element
    if measure == "params":
        costs = [t.groups.sizes.to(torch.float64) for t in targets]
        return costs, overlaps(targets, lambda m: 1.0)
    if example_inputs is None:
        raise ValueError("SparsityTarget: measure='flops' on coupled groups counts the model's "
                         "FLOPs on an example input: give SparsityTarget(example_input=...) "
                         "(or the Regularizer's example_inputs)")
    flops = module_flops(model, example_inputs, forward_fn)
    owners = {}  # by storage: a member is a view of its parameter
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners[p.untyped_storage().data_ptr()] = (name, module, pname)

    def element_flops(m) -> float:
        owner = owners.get(m.tensor.untyped_storage().data_ptr())
        if owner is None or owner[2] != "weight" or not isinstance(owner[1], _dense_types()):
            return 0.0  # biases and norm weights: no multiply-adds of their own
        return flops.get(owner[0], 0) / owner[1].weight.numel()

    costs = []
    for t in targets:
        g = t.groups
        cost = torch.zeros(g.num_groups, dtype=torch.float64)
        for m in g.slices:
            fpe = per_element.setdefault(id(m), element_flops(m))
            if fpe:
                cost += _positions(m, g.num_groups) * (_per_position(m) * fpe)
        unit = g.unit
        if unit is not None and unit.kind == "heads" and g.num_groups:
            module = model.get_submodule(unit.module)
            inner = flops.get(unit.module, 0) - sum(
                flops.get(f"{unit.module}.{n}", 0) for n, c in module.named_children())
            cost += max(inner, 0) / g.num_groups
        costs.append(cost)
    return costs, overlaps(targets, lambda m: per_element[id(m)])


def _positions(m, num_groups: int) -> torch.Tensor:
    """Per group, its positions along the member's axis (float64)."""
    return torch.bincount(torch.as_tensor(m.index).cpu(), minlength=num_groups).to(torch.float64)


def _per_position(m) -> float:
    return m.tensor.numel() / max(m.tensor.shape[m.axis], 1)


def overlaps(targets, element_cost) -> list[tuple]:
    """The elements two sets both count: a tensor that is a member of two sets along two axes
    (a conv's output channels in one, its input channels in the next) holds, for group ``g`` of
    the first and ``h`` of the second, ``positions_g x positions_h x (numel / (size_a x
    size_b))`` elements in both. Per such pair of members: ``(i, j, positions_i, positions_j,
    cost of one crossing element pair)``, ``i``, ``j`` indices into ``targets``."""
    seen: dict[tuple, list] = {}
    out = []
    for i, t in enumerate(targets):
        for m in t.groups.slices:
            key = (m.tensor.untyped_storage().data_ptr(), m.tensor.storage_offset(),
                   tuple(m.tensor.shape), tuple(m.tensor.stride()))
            for j, other in seen.get(key, []):
                if j != i and other.axis != m.axis:
                    pair = m.tensor.numel() / max(m.tensor.shape[m.axis] *
                                                  m.tensor.shape[other.axis], 1)
                    out.append((j, i, _positions(other, targets[j].groups.num_groups),
                                _positions(m, t.groups.num_groups), pair * element_cost(m)))
            seen.setdefault(key, []).append((i, m))
    return out


def module_flops(model, example_inputs, forward_fn=None) -> dict[str, int]:
    """FLOPs of one forward pass per module name ("" the model), by ``FlopCounterMode``
    (the model in eval mode, PyTorch's fused attention fast path off, as ``count_flops``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .stats import _call

    fastpath = torch.backends.mha.get_fastpath_enabled()
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            _call(model, example_inputs, forward_fn)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(training)
    root = type(model).__name__
    out = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == root:
            out[""] = sum(per_op.values())
        elif key.startswith(root + "."):
            out[key[len(root) + 1:]] = sum(per_op.values())
    return out


def sequential_counts(model, example_input, sparsity_stats, measure: str):
    """``(count, costs_of)`` for the plain presets on an ``nn.Sequential``: ``count(measure)
    -> (left, dense)`` params or FLOPs of the compacted model, and ``costs_of(name, size)`` a
    callable giving, per input group of that weight, what removing one more saves now (module
    docstring). Both read one ``sparsity_stats`` (fastprox.stats, passed in: it imports
    compaction, which imports the L0 gates), counted again only once a weight has changed (its
    version moved): the controller asks many times a step."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    weights = [m.weight for m in model.modules() if isinstance(m, WEIGHTED)]
    cache = {}

    def stats():
        key = tuple(w._version for w in weights)
        if cache.get("key") != key:
            counted = sparsity_stats(model, None, example_input=example_input)
            if measure == "flops" and counted.flops_dense is None:
                raise ValueError("SparsityTarget: FLOPs of conv layers need example_input")
            cache.update(key=key, stats=counted, costs=None)
        return cache["stats"]

    def count(measure: str) -> tuple[float, float]:
        counted = stats()
        if measure == "flops":
            return float(counted.flops_remaining), float(counted.flops_dense)
        left = dense = 0
        for layer in counted.layers:
            per_pair = layer.numel // max(layer.inputs_total * layer.outputs_total, 1)
            left += layer.outputs_kept * layer.inputs_kept * per_pair + layer.outputs_kept
            dense += layer.numel + layer.outputs_total
        return float(left), float(dense)

    def per_layer() -> dict[str, float]:
        counted = stats()
        if cache["costs"] is not None:
            return cache["costs"]
        out = {}
        for k, layer in enumerate(counted.layers):
            pair = layer.numel / max(layer.inputs_total * layer.outputs_total, 1)
            positions = 1.0
            if measure == "flops":
                positions = layer.flops_dense / (2 * max(layer.numel, 1))
            cost = layer.outputs_kept * pair * (2 * positions if measure == "flops" else 1)
            if k:
                prev = counted.layers[k - 1]
                per_unit = layer.inputs_total / max(prev.outputs_total, 1)
                prev_pair = prev.numel / max(prev.inputs_total * prev.outputs_total, 1)
                if measure == "flops":
                    prev_positions = prev.flops_dense / (2 * max(prev.numel, 1))
                    cost += 2 * prev.inputs_kept * prev_pair * prev_positions / per_unit
                else:
                    cost += (prev.inputs_kept * prev_pair + 1) / per_unit
            out[names[k]] = cost
        cache["costs"] = out
        return out

    def costs_of(name: str, size: int):
        if name not in names:
            raise ValueError(f"SparsityTarget: {name} is not the weight of a Linear / conv layer "
                             f"of the nn.Sequential (those are {names}); measure="
                             f"{measure!r} counts their compacted {measure}")
        return lambda: torch.full((size,), per_layer()[name], dtype=torch.float64)

    return count, costs_of
