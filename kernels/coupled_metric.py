"""coupled_metric_prox_ on CUDA: the step of coupled groups in an optimizer's diagonal metric
(schema and contract: csrc/fastprox.cpp, docs/SPEC.md), by ``coupled_metric_kernel``
(kernels/coupled_kernels.py), planned here.

Per set, its groups' slices are described once, from the slice table and the members' shapes
and strides alone (cached by their content): consecutive positions of one member in a group
merge into one run, each run a strided region of the member (dims ordered by stride, merged
where contiguous) cut into segments of at most two dims. Sets that share no tensor, and whose
members and moments have one dtype each, form one launch (a wave): one program per group,
largest groups first, reading the members and moments in place. A member of another dtype or
offset than the wave's first is worked on in a copy of its layout (written back after the
launch), a moment whose layout differs from its member's is read from a copy laid out like it,
moments of another dtype than the members' from a copy in the sums' type (float32, or float64).
Every check (the tables, the metric, the moments, over all sets) runs before any launch; the
moments' bounds are read on the host in one transfer.
"""

from __future__ import annotations

import collections
import itertools
import math

import torch

from . import coupled_kernels, launch
from .tables import check_moments
from .tiles import INTERPRET, acc_type, address, max_registers

_OP = "coupled_metric_prox_"
_WIDE_D = 1e18          # a direct metric beyond this: (d x)^2 overflows float32, sums in float64
BLOCK = {False: 1024, True: 512}  # elements of a tile: float32 sums, float64 sums
OFF32_LIMIT = 2 ** 31   # in-segment offsets are int32 below this
WARPS = 4
SEG_COLS = coupled_kernels.SEG_COLS.value  # the columns of the segment table


# ---------------------------------------------------------------------------------------------
# One set's segments, from its slice table and its members' shapes and strides.

class SetLayout:
    """Segments of a set's groups: ``segs`` int64 (S, SEG_COLS) (member within the set, first
    element, n1, s1, n2, s2), in group order; per group its first segment, segment count and
    elements; ``extent``: the largest in-segment offset or element count."""

    __slots__ = ("segs", "first", "count", "elems", "extent", "serial")
    _serials = itertools.count()

    def __init__(self, segs, first, count, elems, extent):
        self.segs, self.first, self.count, self.elems, self.extent = segs, first, count, \
            elems, extent
        self.serial = next(SetLayout._serials)  # names it in the keys of the wave tables


def _collapse(dims):
    """A strided region's (size, stride) dims: size-1 dims dropped, ordered by stride (largest
    first; the order of a group's elements is free), neighbours that are contiguous merged."""
    out = []
    for n, s in sorted(((n, s) for n, s in dims if n != 1), key=lambda d: -d[1]):
        if out and out[-1][1] == n * s:
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out


def _check_table(j, table, begin, extents):
    """The slice table of set j against its members' extents along their axes."""
    if begin.numel() < 1 or int(begin[0]) != 0 or int(begin[-1]) != table.shape[0] or \
            bool((begin[1:] < begin[:-1]).any()):
        raise ValueError(f"{_OP}: starts[{j}] must run from 0 to the number of slices, "
                         "never decreasing")
    if table.numel():
        k, p = table[:, 0], table[:, 1]
        if int(k.min()) < 0 or int(k.max()) >= len(extents):
            raise ValueError(f"{_OP}: slices[{j}] names a member outside its set")
        extent = torch.tensor(extents, dtype=torch.int64)[k]
        bad = (p < 0) | (p >= extent)
        if bool(bad.any()):
            raise ValueError(f"{_OP}: slices[{j}] names position {int(p[bad][0])} outside "
                             "its member")
        key = k * (int(extent.max()) + 1) + p
        if key.unique().numel() != key.numel():
            raise ValueError(f"{_OP}: slices[{j}] names a position twice")


def set_layout(shapes, table, begin) -> SetLayout:
    """The segments of one set: ``shapes`` per member (shape, strides, axis), ``table`` its
    (member, position) rows, ``begin`` where each group's rows start (both checked)."""
    groups = begin.numel() - 1
    rows = table.shape[0]
    counts = begin[1:] - begin[:-1]
    grp = torch.repeat_interleave(torch.arange(groups), counts)
    k, p = table[:, 0], table[:, 1]
    brk = torch.ones(rows, dtype=torch.bool)
    if rows > 1:
        brk[1:] = (k[1:] != k[:-1]) | (p[1:] != p[:-1] + 1) | (grp[1:] != grp[:-1])
    heads = brk.nonzero().squeeze(1)
    lens = torch.diff(heads, append=torch.tensor([rows]))
    rk, rp, rg = k[heads], p[heads], grp[heads]
    parts = []  # per (member, run length): run and sub-index of each segment, its fields
    for km, length in torch.unique(torch.stack([rk, lens], 1), dim=0).tolist():
        shape, stride, axis = shapes[km]
        if math.prod(shape) == 0:
            continue
        rest = [(n, s) for d, (n, s) in enumerate(zip(shape, stride)) if d != axis]
        dims = _collapse([(length, stride[axis])] + rest)
        tail = ([(1, 0), (1, 0)] + dims)[-2:]
        sub = torch.zeros(1, dtype=torch.int64)
        for n, s in dims[:-2]:  # regions of more than two dims: a segment per leading index
            sub = (sub[:, None] + torch.arange(n) * s).reshape(-1)
        sel = ((rk == km) & (lens == length)).nonzero().squeeze(1)
        u = sub.numel()
        fields = torch.tensor([km, 0, tail[0][0], tail[0][1], tail[1][0], tail[1][1]],
                              dtype=torch.int64).repeat(sel.numel() * u, 1)
        fields[:, 1] = ((rp[sel] * stride[axis])[:, None] + sub[None, :]).reshape(-1)
        parts.append((sel.repeat_interleave(u), torch.arange(u).repeat(sel.numel()), fields))
    if not parts:
        empty = torch.zeros(groups, dtype=torch.int64)
        return SetLayout(torch.zeros(0, SEG_COLS, dtype=torch.int64), empty, empty, empty, 0)
    run_of = torch.cat([run for run, _, _ in parts])
    sub_of = torch.cat([sub for _, sub, _ in parts])
    segs = torch.cat([f for _, _, f in parts])
    order = torch.argsort(run_of * (int(sub_of.max()) + 1) + sub_of)  # by run, then sub-index
    segs, run_of = segs[order], run_of[order]
    seg_group = rg[run_of]
    count = torch.bincount(seg_group, minlength=groups)
    first = torch.cumsum(count, 0) - count
    size = segs[:, 2] * segs[:, 4]
    elems = torch.zeros(groups, dtype=torch.int64).index_add_(0, seg_group, size)
    extent = int(torch.maximum((segs[:, 2] - 1) * segs[:, 3] + (segs[:, 4] - 1) * segs[:, 5],
                               size).max())
    return SetLayout(segs, first, count, elems, extent)


class _Cache:
    """A small LRU of what depends only on its key (set layouts, wave tables)."""

    def __init__(self, capacity: int = 128):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, build):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = build()
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value


_layouts = _Cache()
_waves = _Cache()


def _shape_key(w, axis):
    return (tuple(w.shape), tuple(w.stride()), axis)


# ---------------------------------------------------------------------------------------------
# Waves: sets launched together.

def _common_dtype(tensors):
    kinds = {t.dtype for t in tensors}
    if len(kinds) == 1:
        return kinds.pop()
    return torch.float64 if torch.float64 in kinds else torch.float32


def _like(t, layout, dtype):
    """t copied with the strides of ``layout`` (a tensor of t's shape) in ``dtype``."""
    return torch.empty_strided(layout.shape, layout.stride(), dtype=dtype,
                               device=t.device).copy_(t)


def _same_strides(a, b):
    return all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


class Wave:
    """Sets launched together: their members (working tensors, with what to write back), their
    moments (read in place or from copies), per member its metric row, per set its layout,
    thresholds and flags."""

    def __init__(self, dtype, mdtype, wide):
        self.dtype, self.mdtype, self.wide = dtype, mdtype, wide
        self.work, self.moments, self.rows, self.writes = [], [], [], []
        self.sets = []  # (layout, member offset, thresholds, l1, le, exact)
        self.storages: set = set()

    def add(self, members, moments, rows, layout, t, l1, le, exact):
        start = len(self.work)
        for w, v in zip(members, moments):
            work = w if w.dtype == self.dtype else _like(w, w, self.dtype)
            if work is not w:
                self.writes.append((w, work))
            self.work.append(work)
            self.moments.append(v if v.dtype == self.mdtype and _same_strides(v, work)
                                else _like(v, work, self.mdtype))
        self.rows += rows
        self.sets.append((layout, start, t, l1, le, exact))
        self.storages |= {w.untyped_storage().data_ptr() for w in members if w.numel()}

    def align(self):
        """Members and moments addressed from the first of each by a whole element offset
        (a copy for any other: allocations are aligned)."""
        base, mbase = self.work[0], self.moments[0]
        for i, (w, v) in enumerate(zip(self.work, self.moments)):
            if (address(w) - address(base)) % w.element_size():
                work = _like(w, w, self.dtype)
                self.writes.append((w, work))
                self.work[i] = work
            if (address(v) - address(mbase)) % v.element_size():
                self.moments[i] = _like(v, self.work[i], self.mdtype)


def _upload(tables, device) -> list:
    """Host tables (int64 or float64) on the device in one transfer: one int64 buffer, each
    table a view of it starting 16 bytes aligned (the alignment the kernel is compiled for)."""
    parts, views, at = [], [], 0
    for t in tables:
        bits = t.reshape(-1).view(torch.int64)
        pad = -bits.numel() % 2
        parts += [bits, bits.new_zeros(pad)]
        views.append((at, bits.numel(), t.dtype, t.shape))
        at += bits.numel() + pad
    buffer = torch.cat(parts).to(device)
    return [buffer[a:a + n].view(dtype).reshape(shape) for a, n, dtype, shape in views]


def plan_wave(wave: Wave, direct: bool) -> launch.Launch | None:
    """The launch of a wave: its tables (the segment and group tables cached by the sets'
    layouts; the offsets, metric and thresholds built for this call and uploaded together),
    grid one program per group holding a segment, largest first."""
    device = wave.work[0].device
    key = (str(device), *((layout.serial, start, exact)
                          for layout, start, _, _, _, exact in wave.sets))

    def build():
        segs, groups, elems, owner = [], [], [], []
        at = 0
        for j, (layout, start, _, _, _, exact) in enumerate(wave.sets):
            s = layout.segs.clone()
            s[:, 0] += start
            segs.append(s)
            live = (layout.count > 0).nonzero().squeeze(1)
            groups.append(torch.stack([layout.first[live] + at,
                                       layout.first[live] + layout.count[live] + at,
                                       torch.full_like(live, int(bool(exact)))], 1))
            elems.append(layout.elems[live])
            owner.append(torch.stack([torch.full_like(live, j), live], 1))
            at += s.shape[0]
        groups, elems, owner = torch.cat(groups), torch.cat(elems), torch.cat(owner)
        order = torch.argsort(elems, descending=True, stable=True)
        extent = max(layout.extent for layout, *_ in wave.sets)
        return (torch.cat(segs).to(device), groups[order].contiguous().to(device),
                owner[order], extent >= OFF32_LIMIT)

    segs, groups, owner, off64 = _waves.get(key, build)
    num_groups = groups.shape[0]
    if num_groups == 0:
        return None
    thresholds = torch.cat([torch.stack([t, torch.full_like(t, l1), torch.full_like(t, le)], 1)
                            for _, _, t, l1, le, _ in wave.sets])
    firsts = torch.tensor([0] + [t.numel() for _, _, t, _, _, _ in wave.sets]).cumsum(0)
    params = thresholds[firsts[owner[:, 0]] + owner[:, 1]]
    base, mbase = wave.work[0], wave.moments[0]
    offsets = torch.tensor([((address(w) - address(base)) // w.element_size(),
                             (address(v) - address(mbase)) // v.element_size())
                            for w, v in zip(wave.work, wave.moments)], dtype=torch.int64)
    metric = torch.tensor([(s, eps, 1.0 / lr) for s, eps, lr in wave.rows], dtype=torch.float64)
    offsets, metric, params = _upload([offsets, metric, params], device)
    flags = (any(l1 > 0 for _, _, _, l1, _, _ in wave.sets),
             any(bool((t > 0).any()) for _, _, t, _, _, _ in wave.sets),
             any(le > 0 for _, _, _, _, le, _ in wave.sets))
    wide = wave.wide
    args = (base, mbase, offsets, metric, segs, groups, params, num_groups)
    constexprs = dict(BLOCK=BLOCK[wide], OFF64=off64, DIRECT=direct, DO_L1=flags[0],
                      DO_GROUP=flags[1], DO_EXCL=flags[2], WIDE=wide,
                      ACC=acc_type(torch.float64 if wide else torch.float32))
    return launch.Launch("coupled_metric_kernel", (num_groups,), args, constexprs,
                         [dict(num_warps=WARPS)] if INTERPRET else
                         [dict(num_warps=WARPS, maxnreg=max_registers(WARPS))])


# ---------------------------------------------------------------------------------------------
# The op: every check, then the waves.

def _check(members, moments, axes, rows, set_sizes, slices, starts, thresholds, lam_l1,
           lam_exclusive, direct, names, moments_checked):
    """Every check of the call, before anything runs (the moments' values not when the caller
    checked them, unless they are direct metrics, whose largest values are read); per set its
    layout (None: the set has nothing to do) and per moment its largest value (direct metrics
    only: float64 sums beyond 1e18)."""
    n = len(members)
    label = (lambda i: names[i]) if names is not None else (lambda i: f"moments[{i}]")
    if len(moments) != n or len(axes) != n or len(rows) != n:
        raise ValueError(f"{_OP}: moments, axes and metric need one entry per member")
    if sum(set_sizes) != n or any(s < 0 for s in set_sizes):
        raise ValueError(f"{_OP}: set_sizes do not match members")
    for i, (w, v, axis, (scale, eps, lr)) in enumerate(zip(members, moments, axes, rows)):
        if not 0 <= axis < w.dim():
            raise ValueError(f"{_OP}: axes[{i}] must be a dimension of members[{i}]")
        if v.shape != w.shape:
            raise ValueError(f"{_OP}: {label(i)} has shape {tuple(v.shape)}, expected "
                             f"{tuple(w.shape)}")
        if v.device != w.device or not v.is_floating_point():
            raise ValueError(f"{_OP}: {label(i)} must be a floating tensor on {w.device}")
        if not (all(math.isfinite(x) for x in (scale, eps, lr)) and scale >= 0 and eps >= 0
                and lr > 0):
            raise ValueError(f"{_OP}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
    layouts, used = [], []
    first = 0
    for j, size in enumerate(set_sizes):
        if not (math.isfinite(lam_l1[j]) and lam_l1[j] >= 0 and math.isfinite(lam_exclusive[j])
                and lam_exclusive[j] >= 0):
            raise ValueError(f"{_OP}: lam_l1[{j}] and lam_exclusive[{j}] must be finite numbers "
                             ">= 0")
        t, table, begin = thresholds[j], slices[j], starts[j]
        if t.dtype != torch.float64 or t.numel() != begin.numel() - 1 or \
                not bool((torch.isfinite(t) & (t >= 0)).all()):
            raise ValueError(f"{_OP}: thresholds[{j}] must be float64 finite numbers >= 0, one "
                             "per group")
        span = range(first, first + size)
        first += size
        shapes = tuple(_shape_key(members[i], axes[i]) for i in span)
        key = (shapes, table.numpy().tobytes(), begin.numpy().tobytes())

        def build(j=j, table=table, begin=begin, shapes=shapes):
            _check_table(j, table, begin, [s[0][s[2]] for s in shapes])
            return set_layout(shapes, table, begin)

        layout = _layouts.get(key, build)
        active = lam_l1[j] > 0 or lam_exclusive[j] > 0 or bool((t > 0).any())
        layouts.append(layout if active and layout.segs.shape[0] else None)
        if active:
            used += [i for i in span if moments[i].numel()]
    top = check_moments(_OP, moments, used, members, label, lambda j: f"members[{j}]",
                        "(a metric is finite and >= 0); from an optimizer's state, the state "
                        "is damaged: check the loss and gradients for NaN/inf, or reload a "
                        "checkpoint", values=direct or not moments_checked)
    return layouts, top


def coupled_metric_prox_(members, moments, axes, metric, set_sizes, slices, starts, thresholds,
                         lam_l1, lam_exclusive, exact, direct=False, names=None,
                         moments_checked=False):
    rows = metric.reshape(-1, 3).tolist()
    slices = [s.cpu().contiguous() for s in slices]
    starts = [s.cpu().contiguous() for s in starts]
    thresholds = [t.cpu() for t in thresholds]
    layouts, top = _check(members, moments, axes, rows, set_sizes, slices, starts, thresholds,
                          lam_l1, lam_exclusive, direct, names, moments_checked)
    waves: list[Wave] = []
    first = 0
    for j, size in enumerate(set_sizes):
        span = range(first, first + size)
        first += size
        if layouts[j] is None:
            continue
        ws, vs = [members[i] for i in span], [moments[i] for i in span]
        dtype, mdtype = _common_dtype(ws), _common_dtype(vs)
        wide = dtype == torch.float64 or (direct and any(top.get(i, 0.0) > _WIDE_D
                                                         for i in span))
        if mdtype != dtype:  # read in the type the sums take (what the kernel converts them to)
            mdtype = torch.float64 if wide else torch.float32
        storages = {w.untyped_storage().data_ptr() for w in ws if w.numel()}
        wave = waves[-1] if waves else None
        if wave is None or (wave.dtype, wave.mdtype, wave.wide) != (dtype, mdtype, wide) or \
                wave.storages & storages:
            wave = Wave(dtype, mdtype, wide)
            waves.append(wave)
        wave.add(ws, vs, [rows[i] for i in span], layouts[j], thresholds[j],
                 float(lam_l1[j]), float(lam_exclusive[j]), bool(exact[j]))
    with torch.no_grad():
        for wave in waves:
            wave.align()
            lau = plan_wave(wave, bool(direct))
            if lau is not None:
                lau.run(lau.configs[0])
            for w, work in wave.writes:
                w.copy_(work)
