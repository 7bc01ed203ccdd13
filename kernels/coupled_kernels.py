"""The Triton kernel of the coupled step in an optimizer's metric on CUDA (coupled_metric_kernel,
for kernels/coupled_metric.py; docs/SPEC.md, "Proximal steps in an optimizer's metric"): groups
whose slices lie in several tensors (fastprox.coupled), each solved by the rules of the plain
metric step (kernels/metric_kernels.py, whose per-group helpers it calls) on its slices read in
place.

A group is a list of segments, each a strided run of one member: element e of segment s is at
``rel + (e // n2) * s1 + (e % n2) * s2`` from its member's first element (n1 = 1: ``e * s2``),
in the weights and, at the same offsets, in the member's second moment (laid out like it). Per
element d = (sqrt(v s) + eps) / lr with its member's (s, eps, lr), or d = v (DIRECT); per
group, with y the soft threshold by l1 / d and t its own threshold:

    group step:      0 if ||D y|| <= t, else y_i d_i theta / (d_i theta + t), Newton on theta
    exclusive step:  shrink by le S / d_i (S exact, or CGES's bound ||y||_1)

One program per group: a statistics sweep over its segments, a sweep per Newton step, the
exclusive threshold's sweeps, then the rewrite; the sweeps after the first re-read what the first
brought into the caches (a group's slices, its member's moment beside them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .metric_kernels import (MAX_NEWTON, _excl_apply, _excl_step, _excl_terms, _flags,
                             _group_apply, _group_state, _metric_soft, _theta_start, _theta_step,
                             _theta_terms)
from .tile_ops import _load, _sqrt, _threshold_as, _valid

# Columns of the int64 segment table (kernels/coupled_metric.py fills it).
SEG_MEMBER = tl.constexpr(0)   # the member's row of the member tables
SEG_REL = tl.constexpr(1)      # first element, from the member's first element
SEG_N1 = tl.constexpr(2)
SEG_S1 = tl.constexpr(3)
SEG_N2 = tl.constexpr(4)
SEG_S2 = tl.constexpr(5)
SEG_COLS = tl.constexpr(6)
# Columns of the int64 group table: its segments [first, end), the exact exclusive threshold.
GROUP_FIRST = tl.constexpr(0)
GROUP_END = tl.constexpr(1)
GROUP_EXACT = tl.constexpr(2)
GROUP_COLS = tl.constexpr(3)


@triton.jit
def _segment(base, moments, offsets, metric, segs, s, OFF64: tl.constexpr, ACC: tl.constexpr):
    """Segment s: pointers to its first weight and moment element, its shape (n1, s1, n2, s2)
    and its member's metric (s, eps, 1/lr). ``offsets``: per member, its first element counted
    from ``base`` and its moment's from ``moments``."""
    row = segs + s * SEG_COLS
    k = tl.load(row + SEG_MEMBER)
    rel = tl.load(row + SEG_REL)
    p = base + tl.load(offsets + 2 * k) + rel
    q = moments + tl.load(offsets + 2 * k + 1) + rel
    n1 = tl.load(row + SEG_N1)
    s1 = tl.load(row + SEG_S1)
    n2 = tl.load(row + SEG_N2)
    s2 = tl.load(row + SEG_S2)
    if not OFF64:
        n1 = n1.to(tl.int32)
        s1 = s1.to(tl.int32)
        n2 = n2.to(tl.int32)
        s2 = s2.to(tl.int32)
    m = metric + 3 * k
    return p, q, n1, s1, n2, s2, n1 * n2, tl.load(m).to(ACC), tl.load(m + 1).to(ACC), \
        tl.load(m + 2).to(ACC)


@triton.jit
def _segment_tile(e0, n, n1, s1, n2, s2, BLOCK: tl.constexpr):
    """Offsets and mask of elements e0 .. e0 + BLOCK of a segment of n = n1 * n2 elements."""
    e = e0 + tl.arange(0, BLOCK)[None, :]
    mask = e < n
    if n1 == 1:
        off = e * s2
    else:
        off = (e // n2) * s1 + (e % n2) * s2
    return off, mask


@triton.jit
def _coupled_load(p, q, off, mask, l1, s, eps, inv_lr, DIRECT: tl.constexpr,
                  DO_L1: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """(y, d) of a tile of a segment: d its member's metric (0 outside the mask), y the weight
    after the metric soft threshold."""
    x = _load(p + off, mask).to(ACC)
    v = _load(q + off, mask).to(ACC)
    if DIRECT:
        d = tl.where(mask, v, 0.0)
    else:
        d = tl.where(mask, (_sqrt(v * s, WIDE) + eps) * inv_lr, 0.0)
    return _metric_soft(x, d, l1, DO_L1, WIDE), d


@triton.jit
def _coupled_value(p, q, off, mask, l1, thr, s, eps, inv_lr, theta, keep, skip,
                   DIRECT: tl.constexpr, DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                   WIDE: tl.constexpr, ACC: tl.constexpr):
    """(y after the soft threshold and the group step, d) of a tile of a segment."""
    y, d = _coupled_load(p, q, off, mask, l1, s, eps, inv_lr, DIRECT, DO_L1, WIDE, ACC)
    if DO_GROUP:
        y = _group_apply(y, d, theta[:, None], thr, keep[:, None], skip[:, None], WIDE)
    return y, d


# What a sweep over a group's segments sums (_sweep): per group, vectors of one lane.
SWEEP_STATS = tl.constexpr(1)   # NaN count, infinity count, sum (d y)^2, max d
SWEEP_NEWTON = tl.constexpr(2)  # the group step's P and Q at theta
SWEEP_ACTIVE = tl.constexpr(3)  # the exact exclusive threshold's active set: sum |y|, 1/d, count
SWEEP_L1 = tl.constexpr(4)      # sum |y| (CGES's bound)


@triton.jit
def _sweep(base, moments, offsets, metric, segs, first, end, l1, thr, le, theta, keep, skip, S,
           WHAT: tl.constexpr, BLOCK: tl.constexpr, OFF64: tl.constexpr, DIRECT: tl.constexpr,
           DO_L1: tl.constexpr, DO_GROUP: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """One sweep over segments [first, end) of a group: the sums WHAT names, with y after the
    soft threshold (statistics, Newton) or after the group step too (the exclusive threshold).
    Elementwise accumulators, reduced once."""
    a = tl.zeros((1, BLOCK), ACC)
    b = tl.zeros((1, BLOCK), ACC)
    c = tl.zeros((1, BLOCK), ACC)
    m = tl.zeros((1, BLOCK), ACC)
    for sg in range(first, end):
        p, q, n1, s1, n2, s2, n, sc, ep, il = _segment(base, moments, offsets, metric, segs, sg,
                                                       OFF64, ACC)
        for e0 in range(0, n, BLOCK):
            off, mask = _segment_tile(e0, n, n1, s1, n2, s2, BLOCK)
            if WHAT == SWEEP_STATS or WHAT == SWEEP_NEWTON:
                y, d = _coupled_load(p, q, off, mask, l1, sc, ep, il, DIRECT, DO_L1, WIDE, ACC)
            else:
                y, d = _coupled_value(p, q, off, mask, l1, thr, sc, ep, il, theta, keep, skip,
                                      DIRECT, DO_L1, DO_GROUP, WIDE, ACC)
            if WHAT == SWEEP_STATS:
                a += (y != y).to(ACC)
                b += (tl.abs(y) == float("inf")).to(ACC)
                if DO_GROUP:
                    dy = d * y
                    c += dy * dy
                    m = tl.maximum(m, d)
            elif WHAT == SWEEP_NEWTON:
                t_p, t_q = _theta_terms(y, d, theta[:, None], thr, WIDE)
                a += t_p
                b += t_q
            elif WHAT == SWEEP_ACTIVE:
                t_m, t_i, t_c = _excl_terms(tl.abs(y), d, (le * S)[:, None], WIDE, ACC)
                a += t_m
                b += t_i
                c += t_c
            else:
                a += tl.abs(y)
    return tl.sum(a, 1), tl.sum(b, 1), tl.sum(c, 1), tl.max(m, 1)


@triton.jit(do_not_specialize=["num_groups"])
def coupled_metric_kernel(base, moments, offsets, metric, segs, groups, params, num_groups,
                          BLOCK: tl.constexpr, OFF64: tl.constexpr, DIRECT: tl.constexpr,
                          DO_L1: tl.constexpr, DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr,
                          WIDE: tl.constexpr, ACC: tl.constexpr):
    """The coupled metric step of group program_id(0): its segments [first, end) of ``segs``
    (rows of the group table ``groups``), its thresholds (t, l1, le) the row of the float64
    table ``params`` (the formulas above): a statistics sweep, a sweep per Newton step, the
    exclusive threshold's sweeps (_sweep), then the rewrite. Per-group values are vectors of
    one lane, the tiles (1, BLOCK)."""
    gid = tl.program_id(0)
    if gid < num_groups:
        grow = groups + gid * GROUP_COLS
        first = tl.load(grow + GROUP_FIRST)
        end = tl.load(grow + GROUP_END)
        exact = tl.load(grow + GROUP_EXACT) != 0
        prow = params + gid * 3
        t_raw = tl.load(prow)
        l1_raw = tl.load(prow + 1)
        le_raw = tl.load(prow + 2)
        thr = _threshold_as(t_raw, WIDE)
        l1 = _threshold_as(l1_raw, WIDE)
        le = _threshold_as(le_raw, WIDE)
        # a group with no threshold is left as it is (bit-identical: never rewritten)
        if _valid(t_raw) & _valid(l1_raw) & _valid(le_raw) & (t_raw + l1_raw + le_raw > 0):
            nan_g, bad, theta, keep, skip, S, skip_e = _group_state(1, ACC)
            if DO_GROUP or DO_EXCL:
                c_nan, c_inf, dz2, dmax = _sweep(
                    base, moments, offsets, metric, segs, first, end, l1, thr, le, theta, keep,
                    skip, S, SWEEP_STATS, BLOCK, OFF64, DIRECT, DO_L1, DO_GROUP, WIDE, ACC)
                nan_g, bad = _flags(c_nan, c_inf, thr, le)
                if DO_GROUP:
                    theta, keep, skip = _theta_start(dz2, dmax, thr, bad, WIDE)
                    iterate = keep & ~skip
                    k = 0
                    while tl.max(iterate.to(tl.int32), 0) > 0:
                        P, Q, _, _ = _sweep(
                            base, moments, offsets, metric, segs, first, end, l1, thr, le, theta,
                            keep, skip, S, SWEEP_NEWTON, BLOCK, OFF64, DIRECT, DO_L1, DO_GROUP,
                            WIDE, ACC)
                        theta, iterate = _theta_step(theta, iterate, P, Q, WIDE)
                        k += 1
                        iterate = iterate & (k < MAX_NEWTON)
                if DO_EXCL:
                    skip_e = tl.where(le > 0, bad, True)
                    if exact:
                        active = tl.full((1,), -1.0, ACC)
                        iterate = ~skip_e
                        k = 0
                        while tl.max(iterate.to(tl.int32), 0) > 0:
                            s_m, s_i, s_c, _ = _sweep(
                                base, moments, offsets, metric, segs, first, end, l1, thr, le,
                                theta, keep, skip, S, SWEEP_ACTIVE, BLOCK, OFF64, DIRECT, DO_L1,
                                DO_GROUP, WIDE, ACC)
                            S, active, iterate = _excl_step(S, active, iterate, s_m, s_i, s_c,
                                                            le, WIDE)
                            k += 1
                            iterate = iterate & (k < MAX_NEWTON)
                    else:  # CGES's bound: one sweep for ||y||_1
                        S, _, _, _ = _sweep(
                            base, moments, offsets, metric, segs, first, end, l1, thr, le, theta,
                            keep, skip, S, SWEEP_L1, BLOCK, OFF64, DIRECT, DO_L1, DO_GROUP, WIDE,
                            ACC)
            for sg in range(first, end):
                p, q, n1, s1, n2, s2, n, sc, ep, il = _segment(base, moments, offsets, metric,
                                                               segs, sg, OFF64, ACC)
                for e0 in range(0, n, BLOCK):
                    off, mask = _segment_tile(e0, n, n1, s1, n2, s2, BLOCK)
                    y, d = _coupled_value(p, q, off, mask, l1, thr, sc, ep, il, theta, keep,
                                          skip, DIRECT, DO_L1, DO_GROUP, WIDE, ACC)
                    if DO_EXCL:
                        y = _excl_apply(y, d, S[:, None], le, skip_e[:, None], WIDE)
                    if DO_GROUP or DO_EXCL:
                        y = tl.where(nan_g[:, None], float("nan"), y)
                    tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)
