"""The proximal step of groups whose elements lie in several places, in phases.

Used where a group's elements are not in one tensor that one kernel call sees: groups that span
shards of a DTensor (fastprox/distributed.py: the places are ranks) and coupled groups that span
slices of several tensors (fastprox/coupled.py: the places are tensors). Per place, a
``PhasedStep`` computes the group sums it holds (the ``foreach_group_sums`` op: one fused pass);
the caller combines them over the places (an all_reduce, or a sum per coupled group); the step
turns the combined sums into per-group scale and threshold (fastprox/_rules.py: group_scale,
cges_bound, newton_tau, exclusive_tau), iterates the exact exclusive threshold (per Newton step,
the sum and count of the scaled magnitudes above tau: the ``foreach_group_sums_above`` op, one
fused pass, then one combine), and rewrites its elements (the ``foreach_group_rewrite_`` op: one
fused pass). docs/SPEC.md is the contract.

Sums (in float32, float64 for float64 weights) per group and place::

    group / sparse group shrink           1   sum of squares
    exclusive, CGES bound (exact=False)   1   sum of |w|            (+1 with a group step)
    exclusive, exact                      2   sum of |w|, nonzeros  (+1 with a group step)
                                          then 2 (sum and count above tau) per Newton step
"""

from __future__ import annotations

import warnings

import torch

from . import _rules
from ._registry import ops


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class PhasedStep:
    """The proximal step of one tensor (``local``: the part of it this place holds), in phases:
    the first sums (``first_sums`` of a list of steps), (combine by the caller), ``finish``,
    then ``newton_sums`` (of a list of steps) / ``newton`` while ``iterate`` has a True entry,
    and the rewrite
    (``write`` of a list of steps).

    ``dims``: the dimensions summed within a group (the others index the groups; sums keep them,
    size 1 in ``dims``). ``t``: the group threshold ``lam_group * c``, a number or a tensor
    broadcast against the sums (coupled groups: one per group, of its own size)."""

    def __init__(self, local, dims, lam_l1, lam_group, lam_exclusive, exact, t):
        self.local = local
        self.dims = dims
        self.acc = accumulation_dtype(local.dtype)
        self.l1 = lam_l1
        self.t = t
        self.lam_e = lam_exclusive
        self.exact = exact
        self.want_sq = lam_group > 0
        self.want_abs = self.lam_e > 0
        self.want_count = self.want_abs and exact

    @property
    def what(self) -> int:
        """The statistics the first pass takes (foreach_group_sums' ``what``)."""
        return (1 if self.want_sq else 0) | (2 if self.want_abs else 0)

    def take_sums(self, sums: torch.Tensor) -> list[torch.Tensor]:
        """The first pass's sums of this place (``foreach_group_sums``' tensor for it), as the
        list ``finish`` takes after combining: sum of squares, of magnitudes, count of nonzeros
        (those the step needs), each shaped like the local part with size 1 in ``dims``."""
        self.shape = [1 if d in self.dims else s for d, s in enumerate(self.local.shape)]
        sums = [row.reshape(self.shape) for row in sums.unbind(0)]
        return sums if self.want_count or not self.want_abs else sums[:-1]

    def finish(self, sums: list[torch.Tensor]) -> None:
        """Scale and threshold per group from the combined sums."""
        sums = list(sums)
        ones = torch.ones(self.shape, dtype=self.acc, device=self.local.device)
        self.scale = ones
        if self.want_sq:
            self.scale = _rules.group_scale(torch.sqrt(sums.pop(0)), self.t)
        self.tau = torch.zeros_like(ones)
        self.iterate = torch.zeros(self.shape, dtype=torch.bool, device=self.local.device)
        if not self.want_abs:
            return
        l1_norm = sums.pop(0) * self.scale
        if not self.exact:
            tau = _rules.cges_bound(l1_norm, self.lam_e)
        else:
            self.active = sums.pop(0)
            tau = _rules.newton_tau(l1_norm, self.active, self.lam_e)  # first step from 0
            self.iterate = (self.active > 0) & torch.isfinite(l1_norm) & (self.scale != 0)
        self.tau = _rules.exclusive_tau(tau, l1_norm, self.scale)

    def newton(self, sums: list[torch.Tensor]) -> None:
        total, count = sums
        # Newton stops for a group when its active set stops shrinking (then tau is exact).
        go = self.iterate & (count < self.active) & (count > 0)
        self.tau = torch.where(go, torch.maximum(self.tau, _rules.newton_tau(
            total, count, self.lam_e)), self.tau)
        self.active = torch.where(go, count, self.active)
        self.iterate = go

def _by_device(steps: list[PhasedStep], key=lambda s: ()) -> dict:
    out: dict = {}
    for i, s in enumerate(steps):
        out.setdefault((s.local.device, key(s)), []).append(i)
    return out


def _dims_of(steps: list[PhasedStep], idx: list[int]) -> tuple[list[int], list[int]]:
    return [d for i in idx for d in steps[i].dims], [len(steps[i].dims) for i in idx]


def first_sums(steps: list[PhasedStep]) -> list[list[torch.Tensor]]:
    """The first pass of every step: one fused ``foreach_group_sums`` call per device (and set
    of statistics)."""
    out: list = [None] * len(steps)
    for (_, what), idx in _by_device(steps, lambda s: s.what).items():
        sums = ops.foreach_group_sums([steps[i].local for i in idx], *_dims_of(steps, idx),
                                      [float(steps[i].l1) for i in idx], what)
        for i, part in zip(idx, sums):
            out[i] = steps[i].take_sums(part)
    return out


def _kept(step: PhasedStep, value: torch.Tensor) -> torch.Tensor:
    return value.reshape([n for d, n in enumerate(step.local.shape) if d not in step.dims])


def newton_sums(steps: list[PhasedStep]) -> list[list[torch.Tensor]]:
    """A Newton step's sums of every step: per group, the sum and the count of the magnitudes
    m = |pre(x)| * scale above tau (one fused ``foreach_group_sums_above`` call per device),
    shaped like the first sums."""
    out: list = [None] * len(steps)
    for _, idx in _by_device(steps).items():
        sums = ops.foreach_group_sums_above(
            [steps[i].local for i in idx], *_dims_of(steps, idx),
            [float(steps[i].l1) for i in idx],
            [_kept(steps[i], steps[i].scale) if steps[i].want_sq else None for i in idx],
            [_kept(steps[i], steps[i].tau) for i in idx])
        for i, part in zip(idx, sums):
            out[i] = [row.reshape(steps[i].shape) for row in part.unbind(0)]
    return out


def write(steps: list[PhasedStep]) -> None:
    """The rewrite of every step's local part, stored straight into it (rounded once to its
    dtype): one fused ``foreach_group_rewrite_`` call per device."""
    for _, idx in _by_device(steps).items():
        scales, taus = [], []
        for i in idx:
            s = steps[i]
            scales.append(_kept(s, s.scale) if s.want_sq else None)
            taus.append(_kept(s, s.tau) if s.want_abs else None)
        ops.foreach_group_rewrite_([steps[i].local for i in idx], *_dims_of(steps, idx),
                                   [float(steps[i].l1) for i in idx], scales, taus)


def run(steps: list[PhasedStep], combine, max_newton_steps: int, fn: str,
        together: bool = False) -> None:
    """Every phase of ``steps`` together; ``combine(parts)`` sums each step's list of sums over
    the places (same structure back). Every place decides when to stop from the same combined
    values, so places that communicate stay in step without another exchange. ``together``:
    the steps are the places of one set of groups (coupled groups), so each Newton step takes
    the sums of all of them while any group still iterates."""
    parts = first_sums(steps)
    for step, sums in zip(steps, combine(parts)):
        step.finish(sums)
    for _ in range(max_newton_steps):
        live = [s for s in steps if bool(s.iterate.any())]
        if together and live:
            live = steps
        if not live:
            break
        for step, sums in zip(live, combine(newton_sums(live))):
            step.newton(sums)
    else:
        if any(bool(s.iterate.any()) for s in steps):
            warnings.warn(f"{fn}: the exact exclusive threshold did not converge in "
                          f"{max_newton_steps} Newton steps; the step under-shrinks some "
                          "groups (raise max_newton_steps)", RuntimeWarning, stacklevel=3)
    write(steps)
