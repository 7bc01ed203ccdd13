"""Proximal steps on sharded parameters: DTensor, as FSDP2's ``fully_shard`` makes them.

Every operator of fastprox.ops takes a DTensor (its placements ``Shard(d)`` or ``Replicate()``,
on a device mesh of any number of dimensions) and gives the result of the unsharded operator on
the full tensor, each rank writing only its own shard:

* A group that lies within one shard (no mesh dimension shards a reduced dimension, e.g. rows
  of an ``nn.Linear`` weight under FSDP2's ``Shard(0)``): the fused kernel on the local shard,
  no communication.
* A group that spans shards (a mesh dimension shards a reduced dimension, e.g. columns,
  ``dim=0``, under ``Shard(0)``): each rank sums its part of each group, the partial sums are
  all-reduced, and each rank scales its own part. Tensors that reduce over the same process
  groups form a bucket: **one all_reduce per bucket** (per sharding mesh dimension), whatever the
  number of tensors and groups in it.

Values all-reduced per spanning group, in float32 (float64 for float64 weights)::

    group / sparse group shrink           1   sum of squares
    exclusive, CGES bound (exact=False)   1   sum of |w|            (+1 with a group step)
    exclusive, exact                      2   sum of |w|, nonzeros  (+1 with a group step)
                                          then 2 (sum and count above tau) per Newton step

The exact exclusive threshold (docs/SPEC.md's Newton iteration
``tau <- lam S(tau) / (1 + lam k(tau))``) all-reduces S and k of the bucket's still-iterating tensors once per step: it rises
monotonically and stops when no group's active set changes (4-15 steps on random data from
n = 64 to 50257). At ``max_newton_steps`` it stops with a warning; tau is then a lower bound of
the exact threshold, so the step under-shrinks and never over-shrinks.

Every rank decides when to stop from the same all-reduced values, so all ranks stay in step
without another collective. A rank with an empty shard still takes part in every collective.

The spanning path runs the phase ops (fastprox/_phases.py: fused sums, sums above tau and
rewrite) on the local shard (float32 arithmetic for 16-bit types, like the kernels), so its
results equal the unsharded kernel's within float tolerance (partial sums add in another
order), not bit for bit.
"""

from __future__ import annotations

import math

import torch

from . import _checks, _fused, _phases, _rules
from ._checks import is_dtensor
from .operators import COLUMNS

_FN = "fastprox.distributed.foreach_prox_"


def _threshold(value, name: str, weight) -> float:
    """A threshold's value (read here: the spanning path computes with it in Python)."""
    value = _checks.as_threshold(value, name, weight, _FN).item()
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{_FN}: {name} must be finite and >= 0, got {value}")
    return value


def _reduction_groups(weight, dims: list[int], name: str, fn: str = _FN) -> tuple:
    """The process groups over which weight's groups span shards: one per mesh dimension that
    shards a reduced dimension (mesh dimensions of size 1 need none). ``fn`` names the caller
    in errors."""
    if not is_dtensor(weight):
        return ()
    mesh, groups = weight.device_mesh, []
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_partial():
            raise ValueError(f"{fn}: {name} has a Partial placement (pending sums); "
                             "redistribute it to Shard or Replicate first")
        if placement.is_shard() and placement.dim % weight.dim() in dims \
                and mesh.size(mesh_dim) > 1:
            groups.append(mesh.get_group(mesh_dim))
    return tuple(groups)


def _local(weight) -> torch.Tensor:
    return weight.to_local() if is_dtensor(weight) else weight


def _all_reduce(parts: list[list[torch.Tensor]], groups: tuple, acc: torch.dtype) -> list:
    """Sums every tensor of ``parts`` over ``groups`` with one all_reduce per group (a flat
    ``acc`` buffer of the whole bucket), and returns them reshaped as given."""
    import torch.distributed as dist

    flat = [p.reshape(-1).to(acc) for ps in parts for p in ps]
    buffer = torch.cat(flat) if flat else torch.zeros(0, dtype=acc)
    if buffer.numel():
        for group in groups:
            dist.all_reduce(buffer, group=group)
    out, offset = [], 0
    for ps in parts:
        reduced = []
        for p in ps:
            reduced.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        out.append(reduced)
    return out


def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True,
                  max_newton_steps: int = _rules.MAX_NEWTON_STEPS):
    """``fastprox.foreach_prox_`` on a list of DTensors (and plain tensors), sharded any way.

    Same arguments and per-tensor semantics as ``fastprox.foreach_prox_`` (soft threshold by
    ``lam_l1``, group shrink by ``lam_group``, exclusive shrink by ``lam_exclusive``), with the
    groups and ``dim`` of the full (global) tensor. Tensors whose groups lie within their shards
    go through one fused kernel call on the local shards; the others take one all_reduce per
    bucket of tensors sharing the same process groups (plus one per Newton step of the exact
    exclusive threshold, at most ``max_newton_steps``). Collective: every rank of the mesh must
    call it with the same list. Returns ``weights``.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{_FN}: weights must be a list or tuple of tensors, got "
                        f"{type(weights).__name__}")
    if isinstance(max_newton_steps, bool) or not isinstance(max_newton_steps, int) \
            or max_newton_steps < 1:
        raise ValueError(f"{_FN}: max_newton_steps must be an int >= 1, got {max_newton_steps!r}")
    count = len(weights)
    for i, w in enumerate(weights):
        _checks.check_weight(w, _FN, f"weights[{i}]")
        _checks.check_grad(w, _FN, f"weights[{i}]")
        _checks.check_writable(w, _FN, f"weights[{i}]")
    dims = _checks.per_tensor(dim, "dim", count, _FN, _checks.is_dim_spec)
    dims = [_checks.normalize_dim(d, w, f"{_FN}: weights[{i}]")
            for i, (d, w) in enumerate(zip(dims, weights))]
    lams = [[_threshold(v, f"{name}[{i}]", weights[i]) for i, v in
             enumerate(_checks.per_tensor(value, name, count, _FN, _checks.is_threshold))]
            for name, value in zip(COLUMNS, (lam_l1, lam_group, lam_exclusive))]
    sizes, exacts = (_checks.per_tensor(value, name, count, _FN, lambda v: isinstance(v, bool))
                     for name, value in (("size_weighted", size_weighted), ("exact", exact)))
    spans = [_reduction_groups(w, d, f"weights[{i}]") for i, (w, d) in
             enumerate(zip(weights, dims))]

    local: dict[torch.device, list[int]] = {}
    buckets: dict[tuple, list[_phases.PhasedStep]] = {}
    for i, w in enumerate(weights):
        l1, lg, le = (column[i] for column in lams)
        if l1 == 0 and lg == 0 and le == 0:
            continue
        if not spans[i] or (lg == 0 and le == 0):  # groups within the shard, or elementwise
            local.setdefault(_local(w).device, []).append(i)
            continue
        n = math.prod(w.shape[d] for d in dims[i])  # of the full tensor, not the shard
        step = _phases.PhasedStep(_local(w), dims[i], l1, lg, le, exacts[i],
                                  lg * (math.sqrt(n) if sizes[i] else 1.0))
        buckets.setdefault((spans[i], step.acc), []).append(step)

    with torch.no_grad():  # (check_grad above: no weight that needs grad, in grad mode)
        for idx in local.values():
            _fused.prox_([_local(weights[i]) for i in idx],
                         [[column[i] for i in idx] for column in lams], [dims[i] for i in idx],
                         [sizes[i] for i in idx], [exacts[i] for i in idx])
        for (groups, acc), steps in buckets.items():
            _phases.run(steps,
                        lambda parts, groups=groups, acc=acc: _all_reduce(parts, groups, acc),
                        max_newton_steps, _FN)
    return weights


def prox_(weight, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
          size_weighted=True, exact=True):
    """One tensor through ``foreach_prox_``: the single operators' DTensor path."""
    foreach_prox_([weight], lam_l1=lam_l1, lam_group=lam_group, lam_exclusive=lam_exclusive,
                  dim=dim, size_weighted=size_weighted, exact=exact)
    return weight


def group_norms(weight, dim=None):
    """``fastprox.group_norms`` of a DTensor: a DTensor of the per-group norms (replicated over
    the mesh dimensions that shard a reduced dimension), differentiable. Computed with DTensor's
    own ``torch.linalg.vector_norm`` (one collective per tensor)."""
    from torch.distributed.tensor import Replicate

    _checks.check_weight(weight, "group_norms")
    dims = _checks.normalize_dim(dim, weight, "group_norms")
    if not dims:
        return weight.abs()
    norms = torch.linalg.vector_norm(weight, 2, dim=dims)
    placements = [Replicate() if p.is_partial() else p for p in norms.placements]
    return norms.redistribute(norms.device_mesh, placements)


# c10d operators that move no data between ranks
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


class CollectiveCounter:
    """Records the collectives this process issues while active, with the bytes of each one's
    result on this rank (an all_reduce's buffer, an all_gather's gathered tensor): a context
    manager (a torch dispatch mode that sees every c10d collective,
    from ``torch.distributed`` and from DTensor alike).

    Example::

        with fastprox.distributed.CollectiveCounter() as comm:
            reg.prox_step(optimizer)
        print(comm.calls, comm.bytes)   # e.g. 1, 3072
    """

    def __init__(self):
        self.records: list[tuple[str, int]] = []

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.records)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                out = func(*args, **(kwargs or {}))
                if name.startswith(("c10d.", "_c10d_functional.")) \
                        and not name.split(".")[1] in _NOT_COLLECTIVES:
                    # the collective's result on this rank: c10d's ops write into args[0],
                    # the functional ones return it (an all_gather's is the full tensor)
                    result = args[0] if name.startswith("c10d.") else out
                    counter.records.append((name, sum(
                        t.numel() * t.element_size() for t in tree_leaves(result)
                        if isinstance(t, torch.Tensor))))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
