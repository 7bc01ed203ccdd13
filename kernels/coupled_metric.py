"""coupled_metric_prox_ on CUDA: the step of coupled groups in an optimizer's diagonal metric
(schema and contract: csrc/fastprox.cpp, docs/SPEC.md), sets one after another.

Per set, its groups are gathered into a matrix, a row per group (each group's slices one after
another, members in the order of the set's slice rows; padded with z = 0, d = 0, which adds
nothing to any sum and stays 0), in float32 (float64 for float64 members, or where a direct
metric exceeds 1e18, whose square float32 cannot hold), solved by the metric step's kernel
(``foreach_metric_prox_``, one matrix per distinct group threshold t_g, d entering as the moment
d^2 with (s, eps, lr) = (1, 0, 1)) and written back. The CPU kernel
(csrc/cpu/coupled_metric.cpp) gathers one group at a time into a buffer in cache instead; a
fused Triton kernel of the same form is still to come: this path moves every element through
the matrix (three more passes over the members than the CPU kernel).
"""

from __future__ import annotations

import math

import torch

from .metric_prox import foreach_metric_prox_

_OP = "coupled_metric_prox_"
_WIDE_D = 1e18


def _check(members, moments, axes, rows, set_sizes, slices, starts, thresholds, lam_l1,
           lam_exclusive, direct, names):
    n = len(members)
    label = (lambda i: names[i]) if names is not None else (lambda i: f"moments[{i}]")
    if len(moments) != n or len(axes) != n or len(rows) != n:
        raise ValueError(f"{_OP}: moments, axes and metric need one entry per member")
    if sum(set_sizes) != n or any(s < 0 for s in set_sizes):
        raise ValueError(f"{_OP}: set_sizes do not match members")
    for i, (w, v, axis, (scale, eps, lr)) in enumerate(zip(members, moments, axes, rows)):
        if not 0 <= axis < w.dim():
            raise ValueError(f"{_OP}: axes[{i}] must be a dimension of members[{i}]")
        if v.shape != w.shape or v.device != w.device or not v.is_floating_point():
            raise ValueError(f"{_OP}: {label(i)} must be a floating tensor shaped like "
                             f"members[{i}] {tuple(w.shape)} on {w.device}")
        if not (all(math.isfinite(x) for x in (scale, eps, lr)) and scale >= 0 and eps >= 0
                and lr > 0):
            raise ValueError(f"{_OP}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
    for j in range(len(set_sizes)):
        if not (math.isfinite(lam_l1[j]) and lam_l1[j] >= 0 and math.isfinite(lam_exclusive[j])
                and lam_exclusive[j] >= 0):
            raise ValueError(f"{_OP}: lam_l1[{j}] and lam_exclusive[{j}] must be finite numbers "
                             ">= 0")
        t = thresholds[j]
        if t.dtype != torch.float64 or t.numel() != starts[j].numel() - 1 or \
                not bool((torch.isfinite(t) & (t >= 0)).all()):
            raise ValueError(f"{_OP}: thresholds[{j}] must be float64 finite numbers >= 0, one "
                             "per group")
        begin = starts[j]
        if begin.numel() < 1 or int(begin[0]) != 0 or int(begin[-1]) != slices[j].shape[0] or \
                bool((begin[1:] < begin[:-1]).any()):
            raise ValueError(f"{_OP}: starts[{j}] must run from 0 to the number of slices, "
                             "never decreasing")
    first = 0
    for j, size in enumerate(set_sizes):  # then the moments of the sets that do something
        table = slices[j]
        if table.numel():
            k, p = table[:, 0], table[:, 1]
            if int(k.min()) < 0 or int(k.max()) >= size:
                raise ValueError(f"{_OP}: slices[{j}] names a member outside its set")
            extent = torch.tensor([members[first + i].shape[axes[first + i]]
                                   for i in range(size)])[k]
            if bool(((p < 0) | (p >= extent)).any()):
                raise ValueError(f"{_OP}: slices[{j}] names a position outside its member")
            key = k * (int(extent.max()) + 1) + p
            if key.unique().numel() != key.numel():
                raise ValueError(f"{_OP}: slices[{j}] names a position twice")
        if lam_l1[j] > 0 or lam_exclusive[j] > 0 or bool((thresholds[j] > 0).any()):
            for i in range(first, first + size):
                v = moments[i]
                if v.numel() and not bool(torch.isfinite(v).all() & (v >= 0).all()):
                    raise ValueError(f"{_OP}: {label(i)} has negative, NaN or infinite entries "
                                     "(a metric is finite and >= 0); from an optimizer's "
                                     "state, the state is damaged: check the loss and "
                                     "gradients for NaN/inf, or reload a checkpoint")
        first += size


def _one_set(members, moments, axes, rows, table, begin, t, l1, le, exact, direct):
    if not (l1 > 0 or le > 0 or bool((t > 0).any())) or table.shape[0] == 0:
        return
    device = members[0].device
    wide = direct and any(v.numel() and float(v.max()) > _WIDE_D for v in moments)
    acc = torch.float64 if wide or any(w.dtype == torch.float64 for w in members) \
        else torch.float32
    groups = begin.numel() - 1
    per = torch.tensor([w.numel() // max(w.shape[a], 1) for w, a in zip(members, axes)])
    k, p = table[:, 0], table[:, 1]
    counts = begin[1:] - begin[:-1]
    group = torch.repeat_interleave(torch.arange(groups), counts)
    size = per[k]
    before = torch.cat([size.new_zeros(1), size.cumsum(0)])  # elements before each slice
    offset = before[:-1] - before[begin[:-1]][group]  # within the group's row
    width = int((offset + size).max())
    z = torch.zeros(groups * width, dtype=acc, device=device)
    dd = torch.zeros(groups * width, dtype=acc, device=device)
    placed = []
    for i, (w, v, axis, (scale, eps, lr)) in enumerate(zip(members, moments, axes, rows)):
        mine = (k == i).nonzero().squeeze(1)
        if mine.numel() == 0 or per[i] == 0:
            continue
        positions = p[mine].to(device)
        where = (group[mine] * width + offset[mine])[:, None] + torch.arange(int(per[i]))
        where = where.reshape(-1).to(device)
        view = w.movedim(axis, 0)
        z[where] = view[positions].reshape(-1).to(acc)
        vv = v.movedim(axis, 0)[positions].reshape(-1).to(acc)
        d = vv if direct else ((vv * scale).sqrt() + eps) / lr
        dd[where] = d * d
        placed.append((view, positions, where))
    z = z.reshape(groups, width)
    dd = dd.reshape(groups, width)
    values = t.unique()
    parts = [(float(x), (t == x).nonzero().squeeze(1).to(device)) for x in values.tolist()]
    single = len(parts) == 1
    mats = [z] if single else [z[r] for _, r in parts]
    moms = [dd] if single else [dd[r] for _, r in parts]
    n = len(parts)
    foreach_metric_prox_(
        mats, moms, torch.tensor([(l1, x, le) for x, _ in parts], dtype=torch.float64),
        torch.tensor([(1.0, 0.0, 1.0)] * n, dtype=torch.float64), [1] * n, [1] * n,
        [False] * n, [bool(exact)] * n, None)
    if not single:
        for (_, r), mat in zip(parts, mats):
            z[r] = mat
    flat = z.reshape(-1)
    for view, positions, where in placed:
        view[positions] = flat[where].reshape(len(positions), *view.shape[1:]).to(view.dtype)


def coupled_metric_prox_(members, moments, axes, metric, set_sizes, slices, starts, thresholds,
                         lam_l1, lam_exclusive, exact, direct=False, names=None):
    rows = metric.reshape(-1, 3).tolist()
    slices = [s.cpu() for s in slices]
    starts = [s.cpu() for s in starts]
    thresholds = [t.cpu() for t in thresholds]
    _check(members, moments, axes, rows, set_sizes, slices, starts, thresholds, lam_l1,
           lam_exclusive, direct, names)
    first = 0
    with torch.no_grad():
        for j, size in enumerate(set_sizes):
            span = slice(first, first + size)
            first += size
            _one_set(members[span], moments[span], axes[span], rows[span], slices[j], starts[j],
                     thresholds[j], lam_l1[j], lam_exclusive[j], exact[j], direct)
