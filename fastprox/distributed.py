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

The spanning path runs PyTorch operations on the local shard (float32 arithmetic for 16-bit
types, like the kernels), so its results equal the unsharded kernel's within float tolerance
(partial sums add in another order), not bit for bit.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import _checks, _fused, reference
from ._checks import is_dtensor
from ._registry import ops
from .operators import COLUMNS

_FN = "fastprox.distributed.foreach_prox_"


def _threshold(value, name: str, weight) -> float:
    """A threshold's value (read here: the spanning path computes with it in Python)."""
    value = _checks.as_threshold(value, name, weight, _FN).item()
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{_FN}: {name} must be finite and >= 0, got {value}")
    return value


def _reduction_groups(weight, dims: list[int], name: str) -> tuple:
    """The process groups over which weight's groups span shards: one per mesh dimension that
    shards a reduced dimension (mesh dimensions of size 1 need none)."""
    if not is_dtensor(weight):
        return ()
    mesh, groups = weight.device_mesh, []
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_partial():
            raise ValueError(f"{_FN}: {name} has a Partial placement (pending sums); "
                             "redistribute it to Shard or Replicate first")
        if placement.is_shard() and placement.dim % weight.dim() in dims \
                and mesh.size(mesh_dim) > 1:
            groups.append(mesh.get_group(mesh_dim))
    return tuple(groups)


def _local(weight) -> torch.Tensor:
    return weight.to_local() if is_dtensor(weight) else weight


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SpanningStep:
    """The proximal step of one tensor whose groups span shards, in three phases: local sums,
    (all-reduce by the caller), then per-group scale and threshold, and the rewrite.

    The per-group rules (scale, thresholds, NaN/inf/zero groups) are the reference's
    (fastprox/reference.py: group_scale, exclusive_tau, newton_tau), applied to sums that are
    all-reduced across shards."""

    def __init__(self, weight, dims, lam_l1, lam_group, lam_exclusive, size_weighted, exact):
        self.local = _local(weight)
        self.dims = dims
        self.acc = _accumulation_dtype(weight.dtype)
        n = math.prod(weight.shape[d] for d in dims)  # of the full tensor, not the shard
        self.l1 = lam_l1
        self.t = lam_group * (math.sqrt(n) if size_weighted else 1.0)
        self.lam_e = lam_exclusive
        self.exact = exact
        self.want_sq = self.t > 0
        self.want_abs = self.lam_e > 0
        self.want_count = self.want_abs and exact
        self.y = self.m = None  # pre(x) and its magnitudes, while the step runs

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=self.dims, keepdim=True, dtype=self.acc)

    def first_sums(self) -> list[torch.Tensor]:
        """Per group of the local shard: sum of squares, of magnitudes, count of nonzeros (those
        the step needs) of pre(x), the soft-thresholded values."""
        local = self.local
        # group lasso alone on float32/64: the norms of the shard (one pass; the square of a
        # norm is the sum of squares to an ulp), then one in-place multiply
        self.fused = self.l1 == 0 and not self.want_abs and local.dtype == self.acc
        if self.fused:
            keep = [1 if d in self.dims else s for d, s in enumerate(local.shape)]
            sums = [ops.group_norms(local, self.dims).square().reshape(keep)]
            self.shape = sums[0].shape
            return sums
        y = local.to(self.acc)
        if self.l1 > 0:
            y = reference.shrink_magnitude(y, torch.tensor(self.l1, dtype=self.acc))
        self.y = y
        sums = []
        if self.want_sq:
            sums.append(self._sum(y * y))
        if self.want_abs:
            self.m = y.abs()
            sums.append(self._sum(self.m))
            if self.want_count:
                sums.append(self._sum(self.m > 0))
        self.shape = sums[0].shape
        return sums

    def finish(self, sums: list[torch.Tensor]) -> None:
        """Scale and threshold per group from the all-reduced sums."""
        sums = list(sums)
        ones = torch.ones(self.shape, dtype=self.acc)
        self.scale = ones
        if self.want_sq:
            self.scale = reference.group_scale(torch.sqrt(sums.pop(0)), self.t)
        self.tau = torch.zeros(self.shape, dtype=self.acc)
        self.iterate = torch.zeros(self.shape, dtype=torch.bool)
        if not self.want_abs:
            return
        l1_norm = sums.pop(0) * self.scale
        if not self.exact:
            tau = reference.cges_bound(l1_norm, self.lam_e)
        else:
            if self.want_sq:  # the magnitudes the Newton steps look at
                self.m.mul_(self.scale)
            self.active = sums.pop(0)
            tau = reference.newton_tau(l1_norm, self.active, self.lam_e)  # first step from 0
            self.iterate = (self.active > 0) & torch.isfinite(l1_norm) & (self.scale != 0)
        self.tau = reference.exclusive_tau(tau, l1_norm, self.scale)

    def newton_sums(self) -> list[torch.Tensor]:
        """Per group: sum and count of the magnitudes m = |pre(x)| * scale above tau, as
        sum(max(m - tau, 0)) + tau * count (one temporary)."""
        excess = (self.m - self.tau).clamp_(min=0)
        count = self._sum(excess > 0)
        return [self._sum(excess) + self.tau * count, count]

    def newton(self, sums: list[torch.Tensor]) -> None:
        total, count = sums
        # Newton stops for a group when its active set stops shrinking (then tau is exact).
        go = self.iterate & (count < self.active) & (count > 0)
        self.tau = torch.where(go, torch.maximum(self.tau, reference.newton_tau(
            total, count, self.lam_e)), self.tau)
        self.active = torch.where(go, count, self.active)
        self.iterate = go

    def write(self) -> None:
        """The rewrite, stored straight into the shard (rounded once to its dtype)."""
        if self.fused:
            self.local.mul_(self.scale)
        elif not self.want_abs:
            torch.mul(self.y, self.scale, out=self.local)
        else:
            y = self.y * self.scale if self.want_sq else self.y
            reference.shrink_magnitude(y, self.tau, out=self.local)
        self.y = self.m = None


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


def _run_bucket(steps: list[_SpanningStep], groups: tuple, acc: torch.dtype,
                max_newton_steps: int) -> None:
    parts = [s.first_sums() for s in steps]
    for step, sums in zip(steps, _all_reduce(parts, groups, acc)):
        step.finish(sums)
    for _ in range(max_newton_steps):
        live = [s for s in steps if bool(s.iterate.any())]
        if not live:
            break
        for step, sums in zip(live, _all_reduce([s.newton_sums() for s in live], groups, acc)):
            step.newton(sums)
    else:
        if any(bool(s.iterate.any()) for s in steps):
            warnings.warn(f"{_FN}: the exact exclusive threshold did not converge in "
                          f"{max_newton_steps} Newton steps; the step under-shrinks some "
                          "groups (raise max_newton_steps)", RuntimeWarning, stacklevel=3)
    for step in steps:
        step.write()


@torch.no_grad()
def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True, max_newton_steps: int = 64):
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
    buckets: dict[tuple, list[_SpanningStep]] = {}
    for i, w in enumerate(weights):
        l1, lg, le = (column[i] for column in lams)
        if l1 == 0 and lg == 0 and le == 0:
            continue
        if not spans[i] or (lg == 0 and le == 0):  # groups within the shard, or elementwise
            local.setdefault(_local(w).device, []).append(i)
            continue
        step = _SpanningStep(w, dims[i], l1, lg, le, sizes[i], exacts[i])
        buckets.setdefault((spans[i], step.acc), []).append(step)

    for idx in local.values():
        _fused.prox_([_local(weights[i]) for i in idx],
                     [[column[i] for i in idx] for column in lams], [dims[i] for i in idx],
                     [sizes[i] for i in idx], [exacts[i] for i in idx])
    for (groups, acc), steps in buckets.items():
        _run_bucket(steps, groups, acc, max_newton_steps)
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
