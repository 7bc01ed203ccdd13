"""What the plans of a Regularizer's step depend on, as keys compared at every step: a plan
is rebuilt when its key differs (something changed: detected, never assumed).

* ``tensor_key``: where and how a tensor lies (storage, offset, shape, strides, dtype, device);
* ``layout_key``: that of every member of a list of coupled sets;
* ``targets_key``: the plain targets, their parameters' layouts and their ``dim``;
* ``optimizer_key``: the optimizer, its parameter groups and their parameters (and amsgrad).

The plans: fastprox/coupled_plan.py (coupled sets), fastprox/euclidean_plan.py and
fastprox/metric_plan.py (a whole step in each metric).
"""

from __future__ import annotations


def tensor_key(t) -> tuple:
    """Where and how a tensor lies: its storage, offset, shape, strides, dtype and device."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t.device)


def layout_key(sets) -> tuple:
    """What a plan of ``sets`` depends on beyond the sets themselves: each member tensor's
    ``tensor_key``."""
    return tuple(tensor_key(m.tensor) for g in sets for m in g.slices)


def targets_key(targets) -> tuple:
    """The plain targets (presets.Target) by identity, each parameter's identity and layout,
    and each target's ``dim``."""
    return tuple((id(t), id(t.param), tensor_key(t.param), t.dim) for t in targets)


def optimizer_key(optimizer) -> tuple:
    """The optimizer, its parameter groups and their parameters (by identity), and whether
    each group runs amsgrad."""
    return (id(optimizer),) + tuple(
        (id(g), bool(g.get("amsgrad")), tuple(map(id, g["params"])))
        for g in optimizer.param_groups)
