"""Coupled groups: groups whose elements lie in slices of several tensors.

A unit of a real network is rarely one row of one tensor. A conv channel is a filter of the conv
that makes it, an entry of its BatchNorm, and an input channel of every conv that reads it; a
residual channel is read and written by every block of its stage. An attention head is rows of
Q, K and V and columns of the output projection; an MLP neuron a row of the up projection and a
column of the down projection. Removing the unit removes all of them, so its group is all of
them: a ``CoupledGroups`` set.

A set is a list of ``Slice`` members: ``Slice(tensor, axis, index)`` says that position ``i``
along ``axis`` of ``tensor`` (a row for ``axis=0``, a column for ``axis=1`` of a 2-D weight, a
channel, one entry of a 1-D bias or norm weight) belongs to group ``index[i]``. Every position
of a member belongs to one group; a part of a tensor is given as a view (``w[:, :64]``,
``w.narrow(0, 3, 5)``), which the step rewrites in place. Group ``g``'s elements are the
union, over the members, of the slices ``index == g``; ``n_g`` counts them.

``coupled_prox_`` is the proximal step of the whole set (docs/SPEC.md, "Coupled groups"):
group norms and ``|w|`` sums are taken over the union, and every slice of a group gets the
group's scale and threshold. It runs in phases: the sums per slice of every member (one call of
the fused ``foreach_group_sums``); the slices' sums added per group in a fixed order (members in
order, a group's slices in position order: deterministic, bitwise the same from run to run and
for any thread count); the per-group rules; the rewrite of every member (one call of the fused
``foreach_group_rewrite_``). The exact exclusive threshold iterates in the phases of
fastprox/_phases.py (each Newton step one call of the fused ``foreach_group_sums_above``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch

from . import _checks, _fused, _phases, _rules, coupled_plan as _plan
from ._registry import ops

_FN = "coupled_prox_"
waves = _plan.waves  # the sets in waves of sets that share no memory


class Slice(NamedTuple):
    """One member of a coupled set: ``index[i]`` is the group of position ``i`` along ``axis``
    of ``tensor``. ``name`` labels the member in errors and reports (e.g. the parameter name)."""

    tensor: torch.Tensor
    axis: int
    index: object
    name: str = ""


def _label(member: Slice, i: int) -> str:
    return f"slices[{i}] ({member.name})" if member.name else f"slices[{i}]"


class CoupledGroups:
    """A set of ``num_groups`` groups over the ``slices`` (``Slice`` members, or tuples
    ``(tensor, axis, index[, name])``). Checked when built: a tensor of a float dtype, all on one
    device; ``axis`` in range; ``index`` a 1-D sequence of ints, one per position along
    ``axis``, each in ``[0, num_groups)``; no two members sharing memory. Errors name the
    member. ``name`` labels the set (e.g. the module that makes the unit).

    Attributes: ``slices``, ``num_groups``, ``sizes`` (``n_g`` per group, int64), ``labels``
    (optional, one per group, e.g. the channel index in the root layer)."""

    def __init__(self, slices: Sequence, num_groups: int, *, name: str = "", labels=None):
        fn = "CoupledGroups"
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) \
                or num_groups < 0:
            raise ValueError(f"{fn}: num_groups must be an int >= 0, got {num_groups!r}")
        if isinstance(slices, (torch.Tensor, Slice)) or not isinstance(slices, (list, tuple)):
            raise TypeError(f"{fn}: slices must be a list of Slice(tensor, axis, index[, name]), "
                            f"got {type(slices).__name__}")
        if not slices:
            raise ValueError(f"{fn}: slices is empty")
        self.num_groups = int(num_groups)
        self.name = name
        self.labels = labels
        self.unit = None  # what the set removes, when discovered from a model (fastprox.groups)
        members = []
        for i, member in enumerate(slices):
            if not isinstance(member, Slice):
                if not isinstance(member, (tuple, list)) or not 3 <= len(member) <= 4:
                    raise TypeError(f"{fn}: slices[{i}] must be a Slice(tensor, axis, index"
                                    f"[, name]), got {type(member).__name__}")
                member = Slice(*member)
            member = self._check_member(member, i, fn)
            self._check_range(member, i, fn)
            members.append(member)
        device = members[0].tensor.device
        for i, m in enumerate(members):
            if m.tensor.device != device:
                raise ValueError(f"{fn}: {_label(m, i)} is on {m.tensor.device} but slices[0] is "
                                 f"on {device}")
        _check_disjoint(members, fn)
        self.slices = members
        sizes = torch.zeros(self.num_groups, dtype=torch.int64)
        for m in members:
            per_position = m.tensor.numel() // max(m.tensor.shape[m.axis], 1)
            sizes += torch.bincount(m.index, minlength=self.num_groups) * per_position
        self.sizes = sizes
        self._index = [m.index.to(device) for m in members]
        # every member's slices one after another: one gather per statistic adds them per group
        joined = torch.cat([m.index for m in members])
        self._joined = _gather_table(joined, torch.bincount(joined, minlength=self.num_groups),
                                     self.num_groups).to(device)
        self._all_index = joined.to(device)  # per-group values -> per slice: one gather
        self._counts = [len(m.index) for m in members]
        self._keep = [[s if d == m.axis else 1 for d, s in enumerate(m.tensor.shape)]
                      for m in members]
        self._dims = [[d for d in range(m.tensor.dim()) if d != m.axis] for m in members]

    @staticmethod
    def _check_member(member: Slice, i: int, fn: str) -> Slice:
        tensor, axis, index, name = member
        where = _label(member, i)
        if _checks.is_dtensor(tensor):
            raise TypeError(f"{fn}: {where}.tensor is a DTensor; coupled groups take plain "
                            "tensors (sharded coupled groups are not supported)")
        _checks.check_weight(tensor, fn, f"{where}.tensor")
        _checks.check_writable(tensor, fn, f"{where}.tensor")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) \
                or not -tensor.dim() <= axis < tensor.dim():
            raise ValueError(f"{fn}: {where}.axis must be an int in [{-tensor.dim()}, "
                             f"{tensor.dim() - 1}] for a tensor of shape {tuple(tensor.shape)}, "
                             f"got {axis!r}")
        axis = int(axis) % tensor.dim()
        if isinstance(index, torch.Tensor):
            if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
                raise TypeError(f"{fn}: {where}.index must hold integers, got {index.dtype}")
            index = index.detach().to("cpu", torch.int64).clone()
        else:
            try:
                index = torch.as_tensor(list(index), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"{fn}: {where}.index must be a 1-D sequence of ints") from e
        if index.dim() != 1 or index.numel() != tensor.shape[axis]:
            raise ValueError(f"{fn}: {where}.index has shape {tuple(index.shape)}, expected one "
                             f"group per position along axis {axis}: ({tensor.shape[axis]},)")
        return Slice(tensor, axis, index, name)

    def _check_range(self, member: Slice, i: int, fn: str) -> None:
        if member.index.numel() and (int(member.index.min()) < 0
                                     or int(member.index.max()) >= self.num_groups):
            raise ValueError(f"{fn}: {_label(member, i)}.index has groups "
                             f"{int(member.index.min())}..{int(member.index.max())}, outside "
                             f"[0, {self.num_groups})")

    def __len__(self) -> int:
        return self.num_groups

    def __repr__(self) -> str:
        members = ", ".join(f"{m.name or '?'}[axis {m.axis}]" for m in self.slices)
        return f"CoupledGroups({self.name!r}: {self.num_groups} groups over {members})"

    @property
    def device(self) -> torch.device:
        return self.slices[0].tensor.device

    # -- sums ----------------------------------------------------------------------------------
    def _totals(self, per_member: list[torch.Tensor]) -> torch.Tensor:
        """Per group, the sum of per-slice values (one flat tensor per member): members in
        order, each member's slices in position order (one gather, deterministic)."""
        joined = torch.cat([p.reshape(-1) for p in per_member] + [per_member[0].new_zeros(1)])
        return joined[self._joined].sum(dim=1)

    def combine(self, parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Per member, sums per slice (shaped like the member with size 1 off its axis) ->
        per member, the sums of each slice's group (same shapes)."""
        acc = torch.float64 if any(p.dtype == torch.float64 for ps in parts for p in ps) \
            else torch.float32
        totals = [self._totals([ps[k].to(acc) for ps in parts]) for k in range(len(parts[0]))]
        return [[t[index].reshape(p.shape).to(p.dtype) for t, p in zip(totals, ps)]
                for index, ps in zip(self._index, parts)]

    def _summed(self, value) -> torch.Tensor:
        """Per group, the sum of ``value(x)`` over its elements, differentiable."""
        acc = torch.float64 if any(m.tensor.dtype == torch.float64 for m in self.slices) \
            else torch.float32
        parts = []
        for m, dims in zip(self.slices, self._dims):
            v = value(m.tensor.to(acc))
            parts.append(v.sum(dim=dims) if dims else v)
        return self._totals(parts)

    def norms(self) -> torch.Tensor:
        """``||W_g||_2`` per group over the union of its slices (float32, float64 when a member
        is float64); differentiable, with gradient 0 (never NaN) at a zero group."""
        total = self._summed(torch.square)
        positive = total > 0
        return torch.where(positive, torch.sqrt(torch.where(positive, total, 1.0)), 0.0)

    def abs_sums(self) -> torch.Tensor:
        """``||W_g||_1`` per group over the union of its slices; differentiable."""
        return self._summed(torch.abs)

    @torch.no_grad()
    def alive(self) -> torch.Tensor:
        """Per group, whether any of its elements is nonzero (bool, on the CPU)."""
        alive = torch.zeros(self.num_groups, dtype=torch.bool)
        for m in self.slices:
            dims = [d for d in range(m.tensor.dim()) if d != m.axis]
            nonzero = (m.tensor != 0).any(dim=dims) if dims else m.tensor != 0
            alive.index_put_((m.index,), nonzero.cpu(), accumulate=True)
        return alive

    def penalty(self, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0,
                size_weighted: bool = True) -> torch.Tensor:
        """``lam_l1 ||W||_1 + lam_group sum_g c_g ||W_g||_2 + (lam_exclusive/2) sum_g ||W_g||_1^2``
        over the set (``c_g = sqrt(n_g)`` when ``size_weighted``), differentiable."""
        total = torch.zeros((), device=self.device)
        if lam_group > 0:
            c = self.sizes.to(self.device).sqrt() if size_weighted else 1.0
            total = total + lam_group * (c * self.norms()).sum()
        if lam_l1 > 0 or lam_exclusive > 0:
            l1 = self.abs_sums()
            if lam_l1 > 0:
                total = total + lam_l1 * l1.sum()
            if lam_exclusive > 0:
                total = total + 0.5 * lam_exclusive * (l1 * l1).sum()
        return total


def _gather_table(index: torch.Tensor, counts: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[num_groups, most slices of one group] positions of each group's slices in position order,
    padded with len(index) (the position of an appended zero)."""
    width = int(counts.max()) if counts.numel() else 0
    table = torch.full((num_groups, max(width, 1)), len(index), dtype=torch.int64)
    if index.numel():
        order = torch.sort(index, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(index)) - starts[index[order]]
        table[index[order], rank] = order
    return table


def _check_disjoint(members: list[Slice], fn: str) -> None:
    """No two members may share memory: views of one storage must cover disjoint address ranges
    (``w[:3]`` and ``w[3:]``; interleaved ones like ``w[:, :3]`` and ``w[:, 3:]`` are refused)."""
    seen: dict[int, list[tuple[int, int, int]]] = {}
    for i, m in enumerate(members):
        t = m.tensor
        if t.numel() == 0:
            continue
        base = t.untyped_storage().data_ptr()
        lo, hi = _checks.span(t)
        for j, jlo, jhi in seen.get(base, []):
            if lo < jhi and jlo < hi:
                raise ValueError(f"{fn}: {_label(m, i)} and {_label(members[j], j)} share memory "
                                 "(a tensor may be one member only; give disjoint views)")
        seen.setdefault(base, []).append((i, lo, hi))


def _threshold(value, name: str, fn: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{fn}: {name} must be a number or a 0-d real tensor")
        value = float(value)
    else:
        _checks.check_number(value, name, fn)
        value = float(value)
    if not 0 <= value < math.inf:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value}")
    return value


def check_set(groups, fn: str = _FN, name: str = "groups") -> list:
    """A CoupledGroups or a list of them (their members were checked when they were built)."""
    sets = [groups] if isinstance(groups, CoupledGroups) else groups
    if not isinstance(sets, (list, tuple)) or not all(isinstance(g, CoupledGroups)
                                                      for g in sets):
        raise TypeError(f"{fn}: {name} must be a CoupledGroups or a list of them, got "
                        f"{type(groups).__name__}")
    return list(sets)


def coupled_prox_(groups, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0,
                  size_weighted: bool = True, exact: bool = True,
                  max_newton_steps: int = _rules.MAX_NEWTON_STEPS):
    fn = _FN
    sets = check_set(groups, fn)
    values = []
    for name, value in (("lam_l1", lam_l1), ("lam_group", lam_group),
                        ("lam_exclusive", lam_exclusive)):
        values.append(_threshold(value, name, fn))
    l1, lg, le = values
    _checks.check_flag(size_weighted, "size_weighted", fn)
    _checks.check_flag(exact, "exact", fn)
    if isinstance(max_newton_steps, bool) or not isinstance(max_newton_steps, int) \
            or max_newton_steps < 1:
        raise ValueError(f"{fn}: max_newton_steps must be an int >= 1, got {max_newton_steps!r}")
    for g in sets:
        for i, m in enumerate(g.slices):
            _checks.check_grad(m.tensor, fn, f"{_label(m, i)}.tensor")
    if l1 == 0 and lg == 0 and le == 0:
        return groups
    step_sets(sets, [(l1, lg, le)] * len(sets), [size_weighted] * len(sets),
              [exact] * len(sets), max_newton_steps)
    return groups


def step_sets(sets: list[CoupledGroups], lams: list[tuple], size_weighted: list[bool],
              exact: list[bool], max_newton_steps: int) -> None:
    """The step of every set (checked sets, checked per-set thresholds (l1, lg, le) and flags),
    each set's in turn in the order given. Sets that share no memory run together: per wave
    (``waves``), one soft-threshold call for the sets with no group step, one sums call and one
    rewrite call per kind of sums for the sets without Newton steps, and one phased run for the
    exact exclusive ones."""
    with torch.no_grad():
        for wave in _plan.waves(sets):
            soft, one_pass, newton = _kinds(wave, lams, exact)
            if soft:  # the soft threshold alone: elementwise, no groups
                members = [(m.tensor, lams[j][0]) for j in soft for m in sets[j].slices]
                n = len(members)
                _fused.prox_([t for t, _ in members], [[l1 for _, l1 in members], [0.0] * n,
                                                       [0.0] * n], [[]] * n, [True] * n,
                             [True] * n)
            for what, idx in one_pass.items():
                _one_pass_sets([sets[j] for j in idx], [lams[j] for j in idx],
                               [size_weighted[j] for j in idx], what)
            if newton:
                _newton_sets([sets[j] for j in newton], [lams[j] for j in newton],
                             [size_weighted[j] for j in newton], max_newton_steps)


def _kinds(wave, lams, exact) -> tuple[list[int], dict[int, list[int]], list[int]]:
    """The sets of a wave by the step they take: the soft threshold alone, one pass (by the
    statistics it sums: 1 the group norms, 2 the L1 norms), Newton steps."""
    soft, one_pass, newton = [], {}, []
    for j in wave:
        l1, lg, le = lams[j]
        if lg == 0 and le == 0:
            if l1 > 0:
                soft.append(j)
        elif le == 0 or not exact[j]:
            what = (1 if lg > 0 else 0) | (2 if le > 0 else 0)
            one_pass.setdefault(what, []).append(j)
        else:
            newton.append(j)
    return soft, one_pass, newton


def traceable(sets, lams, size_weighted, exact) -> bool:
    """Whether torch.compile can trace ``step_sets`` of these sets with thresholds whose zeros
    are those of ``lams``: every plan it takes was built by an eager step (found, not built:
    building reads storage addresses) and no set takes Newton steps (their stopping test is
    read on the host)."""
    waves = _plan.planned_waves(sets)
    if waves is None:
        return False
    for wave in waves:
        _, one_pass, newton = _kinds(wave, lams, exact)
        if newton:
            return False
        for idx in one_pass.values():
            if _plan.planned_one_pass([sets[j] for j in idx],
                                      [size_weighted[j] for j in idx]) is None:
                return False
    return True


def _thresholds(g: CoupledGroups, lg: float, size_weighted: bool) -> torch.Tensor:
    """t_g = lam_group * c_g per group (float64, on the CPU)."""
    c = g.sizes.to(torch.float64).sqrt() if size_weighted else \
        torch.ones(g.num_groups, dtype=torch.float64)
    return lg * c


def _newton_sets(sets, lams, size_weighted, max_newton_steps) -> None:
    """The exact exclusive step of sets that share no memory: one phased run (each Newton step
    one fused call for every member of every set)."""
    steps, spans = [], []
    for g, (l1, lg, le), sw in zip(sets, lams, size_weighted):
        t = _thresholds(g, lg, sw)
        begin = len(steps)
        for m, index, dims, keep in zip(g.slices, g._index, g._dims, g._keep):
            acc = _phases.accumulation_dtype(m.tensor.dtype)
            steps.append(_phases.PhasedStep(m.tensor, dims, l1, lg, le, True,
                                            t.to(device=index.device, dtype=acc)[index]
                                            .reshape(keep)))
        spans.append((g, begin, len(steps)))

    def combine(parts):
        return [p for g, a, b in spans for p in g.combine(parts[a:b])]

    _phases.run(steps, combine, max_newton_steps, _FN, together=True)


def _one_pass_sets(sets, lams, size_weighted, what: int) -> None:
    """Steps without Newton iterations (group lasso, sparse group lasso, CGES's bound) of sets
    that share no memory, all with the same statistics (``what``): the sums of every member's
    slices in one fused ``foreach_group_sums`` call; the statistics added per group (members
    in order, each member's slices in position order) in one gather per table width; the
    per-group rules of all sets at once; the rewrite of every member in one fused
    ``foreach_group_rewrite_`` call. The member lists and tables are the wave's plan
    (fastprox/coupled_plan.py), built once."""
    plan = _plan.one_pass_plan(sets, size_weighted)
    tensors = [m.tensor for g in sets for m in g.slices]
    l1s = [float(l1) for g, (l1, _, _) in zip(sets, lams) for _ in g.slices]
    group, excl = bool(what & 1), bool(what & 2)
    count = int(group) + int(excl)  # the nonzero count is not used
    sums = ops.foreach_group_sums(tensors, plan.dims, plan.counts, l1s, what)
    scales: list = [None] * len(tensors)
    taus: list = [None] * len(tensors)
    for r in plan.rules:
        totals = []
        for k in range(count):
            parts = []
            for members, table in r.sums:
                flat = [sums[i][k].reshape(-1) for i in members]
                joined = torch.cat([f if f.dtype == r.acc else f.to(r.acc) for f in flat] +
                                   [torch.zeros(1, dtype=r.acc, device=r.device)])
                parts.append(joined[table].sum(dim=1))
            totals.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        t, le = plan.thresholds(r, lams)
        scale = tau = None
        if group:
            scale = _rules.group_scale(torch.sqrt(totals[0]), t)
        if excl:
            s = scale if scale is not None else torch.ones_like(totals[-1])
            l1_norm = totals[-1] * s
            tau = _rules.exclusive_tau(_rules.cges_bound(l1_norm, le), l1_norm, s)
        for out, value in ((scales, scale), (taus, tau)):
            if value is not None:
                for i, part in zip(r.members, value[r.index].split(r.counts)):
                    out[i] = part
    ops.foreach_group_rewrite_(tensors, plan.dims, plan.counts, l1s, scales, taus)
