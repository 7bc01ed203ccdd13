"""Plans of the coupled step (fastprox/coupled.py), built once and reused every step.

A step over coupled sets repeats the same host work each time: which sets may run together
(``waves``), the list of members the fused calls take, and, for the steps without Newton
iterations, the tables that add each set's per-slice sums per group and spread each group's
scale back to its slices. ``OnePassPlan`` holds that work for the sets of a wave, so that a step
is the two fused calls and a handful of batched ops, not about ten small ops per set (on CUDA,
ten launches per set).

A plan is found by the sets it was built for (weak references: a plan keeps no set and no
tensor alive, and a set gone never lends its plan to a new one with its id) and the layout of
every member's tensor (storage, offset, shape, strides, dtype, device), read again at every
step: a member that changes (a parameter replaced, moved, cast or resized) gets a new plan,
detected, not assumed. Thresholds are recomputed when the learning rate or the strengths
change (they are ``lr * lam``).

Results are bitwise those of the step set by set: the per-group sums of sets with the same
table width are one gather and one row sum (each row summed alone, in the same order), and the
per-group rules are elementwise.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from . import _checks
from .plan_keys import layout_key

_PLANS_KEPT = 16  # plans cached (a model's step needs one per wave and kind of statistics)


def _shapes(sets) -> tuple:
    """What torch.compile's guards see of every member's tensor (no storage address, which a
    trace cannot read): shape, strides, dtype and device."""
    return tuple((tuple(m.tensor.shape), tuple(m.tensor.stride()), m.tensor.dtype,
                  m.tensor.device) for g in sets for m in g.slices)


class _Cache:
    """A few plans, found by (kind, the sets (by identity), their layout key).

    Under torch.compile a plan is found without reading storage addresses where it can be:
    ``find`` takes the plan an eager step built for the same sets, with the same shapes,
    strides, dtypes and devices (what the compiled graph's guards check at every call); a
    Regularizer's step is traced only when every plan it takes is found
    (``coupled.traceable``). Not found (a coupled op called in a compiled function before
    any eager step), it is looked up and built as eagerly, which breaks the graph there."""

    def __init__(self) -> None:
        self._plans: OrderedDict = OrderedDict()

    def get(self, kind, sets, build):
        if torch.compiler.is_compiling():
            plan = self.find(kind, sets)
            if plan is not None:
                return plan
        ids = (kind,) + tuple(id(g) for g in sets)
        layout = layout_key(sets)
        entry = self._plans.get(ids)
        if entry is not None and entry[1] == layout and all(
                ref() is g for ref, g in zip(entry[0], sets)):
            self._plans.move_to_end(ids)
            return entry[2]
        plan = build()
        self._plans[ids] = ([weakref.ref(g) for g in sets], layout, plan, _shapes(sets))
        self._plans.move_to_end(ids)
        while len(self._plans) > _PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def find(self, kind, sets):
        """The plan of ``kind`` an eager step built for ``sets`` as they are now (their
        shapes, strides, dtypes, devices), or None."""
        entry = self._plans.get((kind,) + tuple(id(g) for g in sets))
        if entry is None or entry[3] != _shapes(sets) or not all(
                ref() is g for ref, g in zip(entry[0], sets)):
            return None
        return entry[2]


_CACHE = _Cache()


def waves(sets) -> list[list[int]]:
    """The sets in waves: a set goes in the wave after the last one holding an earlier set it
    shares memory with, so running the waves in order, each wave's sets together, is running
    the sets one after another in the order given (planned once per list of sets)."""
    return _CACHE.get("waves", sets, lambda: _waves(sets))


def planned_waves(sets):
    """The waves an eager step planned for ``sets`` as they are now, or None."""
    return _CACHE.find("waves", sets)


def planned_one_pass(sets, size_weighted):
    """The one-pass plan an eager step built for ``sets`` as they are now, or None."""
    return _CACHE.find(("one pass", tuple(size_weighted)), sets)


def _waves(sets) -> list[list[int]]:
    seen: dict[int, list[tuple[int, int, int]]] = {}  # storage -> (set, lo, hi) of members
    wave_of: list[int] = []
    for j, g in enumerate(sets):
        wave = 0
        spans = []
        for m in g.slices:
            if m.tensor.numel() == 0:
                continue
            base = m.tensor.untyped_storage().data_ptr()
            lo, hi = _checks.span(m.tensor)
            for i, ilo, ihi in seen.get(base, []):
                if lo < ihi and ilo < hi:
                    wave = max(wave, wave_of[i] + 1)
            spans.append((base, lo, hi))
        for base, lo, hi in spans:
            seen.setdefault(base, []).append((j, lo, hi))
        wave_of.append(wave)
    out: list[list[int]] = [[] for _ in range(max(wave_of, default=-1) + 1)]
    for j, w in enumerate(wave_of):
        out[w].append(j)
    return out


def one_pass_plan(sets, size_weighted) -> "OnePassPlan":
    """The plan of the one-pass step of ``sets`` (a wave's sets with the same statistics)."""
    return _CACHE.get(("one pass", tuple(size_weighted)), sets,
                      lambda: OnePassPlan(sets, size_weighted))


class _Rules:
    """The sets of a wave whose per-group rules run together: one accumulation dtype and one
    device. ``sums``: per table width, (the positions in the wave's member list of the members
    summed, the joined table over their sums); ``sets``: the wave's sets in this order."""

    def __init__(self, acc, device):
        self.acc, self.device = acc, device
        self.sets: list[int] = []
        self.sums: list[tuple[list[int], torch.Tensor]] = []
        self.c = None  # float64 (CPU): c_g of every group, sets in order
        self.groups: list[int] = []  # groups per set
        self.index = None  # per slice of every member in order: its group, on the device
        self.counts: list[int] = []  # slices per member, members in order
        self.members: list[int] = []  # positions of those members in the wave's member list
        self.set_of_group = None  # int64 (CPU): per group, its set's position in ``sets``
        self.last = None  # (per-set (lg, le), t, le per group) of the last step


class OnePassPlan:
    """The member list of the fused calls (their dims; the tensors are the sets' own, taken
    at each step) and the tables of the per-group rules of the sets of a wave, for the steps
    without Newton iterations (group lasso, sparse group lasso, CGES's bound)."""

    def __init__(self, sets, size_weighted):
        self.dims, self.counts = [], []
        first = []  # the position of each set's first member in the member list
        members = 0
        for g in sets:
            first.append(members)
            members += len(g.slices)
            self.dims += [d for ds in g._dims for d in ds]
            self.counts += [len(ds) for ds in g._dims]
        self.rules: list[_Rules] = []
        buckets: dict = {}
        for j, g in enumerate(sets):
            acc = torch.float64 if any(m.tensor.dtype == torch.float64 for m in g.slices) \
                else torch.float32
            key = (acc, g.device)
            if key not in buckets:
                buckets[key] = _Rules(acc, g.device)
                self.rules.append(buckets[key])
            buckets[key].sets.append(j)
        for r in self.rules:
            # sets ordered by table width: the sets of one width are summed in one gather
            r.sets.sort(key=lambda j: (sets[j]._joined.shape[1], j))
            by_width: dict[int, list[int]] = {}
            for j in r.sets:
                by_width.setdefault(sets[j]._joined.shape[1], []).append(j)
            offset = 0
            index, cs = [], []
            for width, js in by_width.items():
                members, tables, length = [], [], 0
                for j in js:
                    g = sets[j]
                    n = sum(g._counts)  # slices of the set: its per-slice sums
                    own = g._joined.to("cpu")
                    # each set's table points into its own members' sums and at a zero past
                    # them (n); here into the sums of every set of this width, one zero last
                    tables.append(torch.where(own < n, own + length, -1))
                    members += list(range(first[j], first[j] + len(g.slices)))
                    length += n
                table = torch.cat(tables)
                table = torch.where(table < 0, length, table).to(r.device)
                r.sums.append((members, table))
                for j in js:
                    g = sets[j]
                    c = g.sizes.to(torch.float64).sqrt() if size_weighted[j] else \
                        torch.ones(g.num_groups, dtype=torch.float64)
                    cs.append(c)
                    r.groups.append(g.num_groups)
                    index.append(g._all_index.to("cpu") + offset)
                    offset += g.num_groups
                    r.counts += g._counts
                    r.members += list(range(first[j], first[j] + len(g.slices)))
            r.c = torch.cat(cs) if cs else torch.zeros(0, dtype=torch.float64)
            r.set_of_group = torch.repeat_interleave(
                torch.arange(len(r.groups)), torch.tensor(r.groups, dtype=torch.int64))
            r.index = (torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
                       ).to(r.device)

    def thresholds(self, r: _Rules, lams) -> tuple:
        """(t, le) per group of ``r``'s sets, in ``r.acc`` on its device, for the per-set
        thresholds ``lams`` (l1, lg, le): t_g = lg * c_g (float64, then rounded), le as each
        set's le; reused while the thresholds stay the same."""
        own = tuple((float(lams[j][1]), float(lams[j][2])) for j in r.sets)
        traced = torch.compiler.is_compiling()  # (in the graph: computed, not kept)
        if not traced and r.last is not None and r.last[0] == own:
            return r.last[1], r.last[2]
        lg = torch.tensor([a for a, _ in own], dtype=torch.float64)[r.set_of_group]
        le = torch.tensor([b for _, b in own], dtype=torch.float64)[r.set_of_group]
        t = (lg * r.c).to(device=r.device, dtype=r.acc)
        le = le.to(device=r.device, dtype=r.acc)
        if not traced:
            r.last = (own, t, le)
        return t, le
