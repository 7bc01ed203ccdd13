"""The Triton kernel of the proximal step in an optimizer's metric on CUDA (metric_kernel, for
kernels/metric_prox.py; docs/SPEC.md, "Proximal steps in an optimizer's metric"), over the same
blocks and tables as prox_kernel (kernels/prox_kernels.py), and the per-group rules it shares
with the coupled metric kernel (kernels/coupled_kernels.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_ops import (_shrink, _sqrt, _div, _inv, _valid, _tensor_params, _block, _load, _tile,
                       META_LAM, META_COLS)

# -- Proximal steps in an optimizer's metric (kernels/metric_prox.py; docs/SPEC.md, "Proximal
# steps in an optimizer's metric"). Per element d = (sqrt(v * s) + eps) / lr from the second
# moment v (read beside the weight, at the same offsets from its own base); per group, with y the
# weight after the metric soft threshold sign(x) max(|x| - l1/d, 0) (d = 0: 0):
#     group step:      0 if ||D y|| <= t, else y_i d_i theta / (d_i theta + t), theta the root of
#                      F(theta) = sum (d_i y_i / (d_i theta + t))^2 = 1, by Newton's method on
#                      phi = F^(-1/2) - 1 from theta_L = (||D y|| - t) / max d (monotone, few steps)
#     exclusive step:  shrink by tau_i = le S / d_i (d_i = 0: +inf), S = ||y||_1 (bound) or the
#                      root of S = sum max(|y_i| - le S/d_i, 0) (exact: Newton from S = 0 on the
#                      active set {d_i |y_i| > le S}, sum |y| / (1 + le sum 1/d), until it stops
#                      shrinking)
# NaN groups become NaN, groups with an infinite value keep their values, a zero group stays zero
# (when a group or exclusive threshold is set; the soft threshold alone is elementwise).

MAX_NEWTON = tl.constexpr(100)  # bound on the Newton steps of one scalar equation (as the CPU)


@triton.jit
def _metric_params(meta, metric, t, ACC: tl.constexpr):
    """(valid, s, eps, 1/lr) of tensor t: its row of the (T, 3) float64 metric table."""
    row = metric + tl.load(meta + t * META_COLS + META_LAM) * 3
    s = tl.load(row)
    eps = tl.load(row + 1)
    inv_lr = tl.load(row + 2)
    valid = _valid(s) & _valid(eps) & _valid(inv_lr) & (inv_lr > 0)
    return valid, s.to(ACC), eps.to(ACC), inv_lr.to(ACC)


@triton.jit
def _metric_soft(x, d, l1, DO_L1: tl.constexpr, WIDE: tl.constexpr):
    """The metric soft threshold of x by l1 / d: an element with d = 0 becomes 0, NaN stays NaN,
    an infinite x stays infinite (l1 / d is finite for d > 0, and may overflow); l1 == 0: x as
    it is."""
    y = x
    if DO_L1:
        infinite = (x * 0 != 0) & (x == x)
        soft = tl.where(d > 0, tl.where(infinite, x, _shrink(x, l1 * _inv(d, WIDE), WIDE)),
                        tl.where(x != x, x, 0.0))
        y = tl.where(l1 > 0, soft, x)
    return y


@triton.jit
def _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1: tl.constexpr, WIDE: tl.constexpr,
                 ACC: tl.constexpr):
    """(y, d) of a tile: d = (sqrt(v s) + eps) / lr (0 outside the mask) and y the weight after
    the metric soft threshold by l1 / d (_metric_soft)."""
    x = _load(p + off, mask).to(ACC)
    v = _load(q + off, mask).to(ACC)
    d = tl.where(mask, (_sqrt(v * s, WIDE) + eps) * inv_lr, 0.0)
    return _metric_soft(x, d, l1, DO_L1, WIDE), d


@triton.jit
def _sum2(x):
    return tl.sum(tl.sum(x, 2), 0)


@triton.jit
def _flags(nan_count, inf_count, thr, le):
    """Per group: NaN (becomes NaN), bad (NaN or an infinite value: both steps skip it)."""
    nan_g = nan_count > 0
    return tl.where(thr + le > 0, nan_g, False), nan_g | (inf_count > 0)


@triton.jit
def _theta_start(dz2, dmax, thr, bad, WIDE: tl.constexpr):
    """(theta_L, keep, skip) of the group step from sum (d y)^2 and max d: a group is kept iff
    ||D y|| > t; skip: the step leaves the group as it is (t = 0, NaN or infinite values)."""
    a = _sqrt(dz2, WIDE)
    keep = a > thr
    theta = tl.where(keep, _div(tl.where(keep, a - thr, 0.0), tl.where(keep, dmax, 1.0), WIDE),
                     0.0)
    return theta, keep, tl.where(thr > 0, bad, True)


@triton.jit
def _theta_terms(y, d, theta, thr, WIDE: tl.constexpr):
    """Per element, its terms of P = sum (w y)^2 and Q = sum w (w y)^2, w = d theta / (d theta
    + t) in [0, 1]: F(theta) = P / theta^2 and its slope -F'/2 = Q / theta^3, sums bounded by
    ||y||^2 (F itself and its slope can overflow float32 where d spans many decades)."""
    dth = d * theta
    w = dth * _inv(dth + thr, WIDE)
    wy = w * y
    p = wy * wy
    return p, w * p


@triton.jit
def _theta_step(theta, iterate, P, Q, WIDE: tl.constexpr):
    """One Newton step on phi = F^(-1/2) - 1, theta + (F^(3/2) - F) / slope, which is
    theta + (sqrt(P) - theta) P / Q; taken while F > 1 (P > theta^2), done when it no longer
    moves theta by more than 4 ulps (rounding), or after a step of at most 2^-13 of theta
    (2^-28 in float64: from the left, Newton's method converges quadratically, and what is
    left, about the square of the step, is below rounding; the CPU's rule)."""
    if WIDE:
        ulp = 2.220446049250313e-16
        converged = 3.725290298461914e-09  # 2^-28
    else:
        ulp = 1.1920928955078125e-07
        converged = 0.0001220703125  # 2^-13
    go = iterate & (P > theta * theta) & (Q > 0)
    nxt = theta + (_sqrt(P, WIDE) - theta) * _div(tl.where(go, P, 0.0), tl.where(go, Q, 1.0),
                                                  WIDE)
    small = ~(nxt > theta * (1 + 4 * ulp))
    done = small | (nxt - theta <= theta * converged)
    theta = tl.where(go, tl.where(small, tl.maximum(theta, nxt), nxt), theta)
    return theta, go & ~done


@triton.jit
def _group_apply(y, d, theta, thr, keep, skip, WIDE: tl.constexpr):
    """The group step's result: y d theta / (d theta + t) on kept groups, 0 on the others, y
    where it is skipped (per-group values broadcast over the tile)."""
    dth = d * theta
    moved = tl.where(keep, y * dth * _inv(dth + tl.where(skip, 1.0, thr), WIDE), 0.0)
    return tl.where(skip, y, moved)


@triton.jit
def _excl_terms(m, d, bar, WIDE: tl.constexpr, ACC: tl.constexpr):
    """The active set {d > 0, d m > le S} of the exact exclusive threshold: per element, its
    |y|, 1/d and count."""
    sel = (d > 0) & (d * m > bar)
    return tl.where(sel, m, 0.0), tl.where(sel, _inv(tl.where(sel, d, 1.0), WIDE), 0.0), \
        sel.to(ACC)


@triton.jit
def _excl_step(S, active, iterate, s_m, s_inv, count, le, WIDE: tl.constexpr):
    """One Newton step of S: sum_A |y| / (1 + le sum_A 1/d), while the active set shrinks."""
    go = iterate & (count > 0) & (count != active)
    S = tl.where(go, tl.maximum(S, _div(s_m, 1 + le * s_inv, WIDE)), S)
    return S, tl.where(go, count, active), go


@triton.jit
def _excl_apply(y, d, S, le, skip, WIDE: tl.constexpr):
    """Shrink by tau = le S / d (d = 0: +inf), y where the step is skipped."""
    tau = tl.where(d > 0, le * S * _inv(tl.where(d > 0, d, 1.0), WIDE), float("inf"))
    return tl.where(skip, y, _shrink(y, tau, WIDE))


@triton.jit
def _metric_fused(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps, inv_lr,
                  BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, DO_L1: tl.constexpr,
                  DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr, WIDE: tl.constexpr,
                  ACC: tl.constexpr):
    """Blocks whose groups fit the tile: the weight and the moment read once into registers,
    every Newton step there, one write."""
    o = tl.arange(0, BLOCK_O)[:, None, None]
    i = tl.arange(0, BLOCK_I)[None, None, :]
    off, mask = _tile(o, gg[None, :, None], i, outer, groups, inner, BLOCK_I)
    y, d = _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1, WIDE, ACC)
    if DO_GROUP or DO_EXCL:
        nan_g, bad = _flags(_sum2((y != y).to(ACC)), _sum2((tl.abs(y) == float("inf")).to(ACC)),
                            thr, le)
        if DO_GROUP:
            dy = d * y
            theta, keep, skip = _theta_start(_sum2(dy * dy), tl.max(tl.max(d, 2), 0), thr, bad,
                                             WIDE)
            iterate = keep & ~skip
            k = 0
            while tl.max(iterate.to(tl.int32), 0) > 0:
                f_t, s_t = _theta_terms(y, d, theta[None, :, None], thr, WIDE)
                theta, iterate = _theta_step(theta, iterate, _sum2(f_t), _sum2(s_t), WIDE)
                k += 1
                iterate = iterate & (k < MAX_NEWTON)
            y = _group_apply(y, d, theta[None, :, None], thr, keep[None, :, None],
                             skip[None, :, None], WIDE)
        if DO_EXCL:
            skip_e = tl.where(le > 0, bad, True)
            m = tl.abs(y)
            S = _sum2(m)  # CGES's bound
            if exact:
                S = tl.zeros(S.shape, ACC)
                active = tl.full(S.shape, -1.0, ACC)
                iterate = ~skip_e
                k = 0
                while tl.max(iterate.to(tl.int32), 0) > 0:
                    a_m, a_i, a_c = _excl_terms(m, d, (le * S)[None, :, None], WIDE, ACC)
                    S, active, iterate = _excl_step(S, active, iterate, _sum2(a_m), _sum2(a_i),
                                                    _sum2(a_c), le, WIDE)
                    k += 1
                    iterate = iterate & (k < MAX_NEWTON)
            y = _excl_apply(y, d, S[None, :, None], le, skip_e[None, :, None], WIDE)
        y = tl.where(nan_g[None, :, None], float("nan"), y)
    tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _group_state(N: tl.constexpr, ACC: tl.constexpr):
    """The per-group state of N groups before their statistics, shared by the looped and the
    coupled metric kernels: (nan_g, bad, theta, keep, skip, S, skip_e) = no group NaN or
    non-finite, theta 0, none kept, every one skipped by the group step and by the exclusive
    step (S = 0): what a step with neither sub-step leaves, each group as it is."""
    zero = tl.zeros((N,), ACC)
    no = zero != zero
    return no, no, zero, no, ~no, zero, ~no


@triton.jit
def _metric_value(p, q, off, mask, l1, thr, s, eps, inv_lr, theta, keep, skip,
                  DO_L1: tl.constexpr, DO_GROUP: tl.constexpr, WIDE: tl.constexpr,
                  ACC: tl.constexpr):
    """(y after the soft threshold and the group step, d) of a sub-tile, from memory."""
    y, d = _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1, WIDE, ACC)
    if DO_GROUP:
        y = _group_apply(y, d, theta[None, :, None], thr, keep[None, :, None],
                         skip[None, :, None], WIDE)
    return y, d


@triton.jit
def _metric_looped(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps, inv_lr,
                   LOOP_O: tl.constexpr, BLOCK_G: tl.constexpr, LOOP_I: tl.constexpr,
                   BLOCK_I: tl.constexpr, DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                   DO_EXCL: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """Blocks whose groups do not fit: a statistics sweep, a sweep per Newton step, a sweep for
    the exclusive threshold, then the rewrite, each over LOOP_O x BLOCK_G x LOOP_I sub-tiles of
    the weight and the moment (re-read from L2 while the blocks in flight fit it)."""
    lo = tl.arange(0, LOOP_O)[:, None, None]
    li = tl.arange(0, LOOP_I)[None, None, :]
    g = gg[None, :, None]
    nan_g, bad, theta, keep, skip, S, skip_e = _group_state(BLOCK_G, ACC)
    if DO_GROUP or DO_EXCL:
        c_nan = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
        c_inf = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
        s_dz = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
        m_d = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
        for o0 in range(0, outer, LOOP_O):
            for i0 in range(0, inner, LOOP_I):
                off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                y, d = _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1, WIDE, ACC)
                c_nan += (y != y).to(ACC)
                c_inf += (tl.abs(y) == float("inf")).to(ACC)
                if DO_GROUP:
                    dy = d * y
                    s_dz += dy * dy
                    m_d = tl.maximum(m_d, d)
        nan_g, bad = _flags(_sum2(c_nan), _sum2(c_inf), thr, le)
        if DO_GROUP:
            theta, keep, skip = _theta_start(_sum2(s_dz), tl.max(tl.max(m_d, 2), 0), thr, bad,
                                             WIDE)
            iterate = keep & ~skip
            k = 0
            while tl.max(iterate.to(tl.int32), 0) > 0:
                f_t = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                s_t = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                for o0 in range(0, outer, LOOP_O):
                    for i0 in range(0, inner, LOOP_I):
                        off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                        y, d = _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1, WIDE,
                                            ACC)
                        a, b = _theta_terms(y, d, theta[None, :, None], thr, WIDE)
                        f_t += a
                        s_t += b
                theta, iterate = _theta_step(theta, iterate, _sum2(f_t), _sum2(s_t), WIDE)
                k += 1
                iterate = iterate & (k < MAX_NEWTON)
        if DO_EXCL:
            skip_e = tl.where(le > 0, bad, True)
            if exact:
                active = tl.full((BLOCK_G,), -1.0, ACC)
                iterate = ~skip_e
                k = 0
                while tl.max(iterate.to(tl.int32), 0) > 0:
                    a_m = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                    a_i = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                    a_c = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                    for o0 in range(0, outer, LOOP_O):
                        for i0 in range(0, inner, LOOP_I):
                            off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner,
                                              BLOCK_I)
                            y, d = _metric_value(p, q, off, mask, l1, thr, s, eps, inv_lr,
                                                 theta, keep, skip, DO_L1, DO_GROUP, WIDE, ACC)
                            t_m, t_i, t_c = _excl_terms(tl.abs(y), d, (le * S)[None, :, None],
                                                        WIDE, ACC)
                            a_m += t_m
                            a_i += t_i
                            a_c += t_c
                    S, active, iterate = _excl_step(S, active, iterate, _sum2(a_m), _sum2(a_i),
                                                    _sum2(a_c), le, WIDE)
                    k += 1
                    iterate = iterate & (k < MAX_NEWTON)
            else:  # CGES's bound: one sweep for ||y||_1
                a_m = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                for o0 in range(0, outer, LOOP_O):
                    for i0 in range(0, inner, LOOP_I):
                        off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                        y, d = _metric_value(p, q, off, mask, l1, thr, s, eps, inv_lr, theta,
                                             keep, skip, DO_L1, DO_GROUP, WIDE, ACC)
                        a_m += tl.abs(y)
                S = _sum2(a_m)
    for o0 in range(0, outer, LOOP_O):
        for i0 in range(0, inner, LOOP_I):
            off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
            y, d = _metric_value(p, q, off, mask, l1, thr, s, eps, inv_lr, theta, keep, skip,
                                 DO_L1, DO_GROUP, WIDE, ACC)
            if DO_EXCL:
                y = _excl_apply(y, d, S[None, :, None], le, skip_e[None, :, None], WIDE)
            if DO_GROUP or DO_EXCL:
                y = tl.where(nan_g[None, :, None], float("nan"), y)
            tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_blocks", "per_program"])
def metric_kernel(base, moments, meta, lams, metric, moment_offsets, blocks, num_blocks,
                  per_program, BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_I: tl.constexpr, LOOP_O: tl.constexpr, LOOP_I: tl.constexpr,
                  FIT: tl.constexpr, VEC: tl.constexpr, OFF64: tl.constexpr,
                  DO_L1: tl.constexpr, DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr,
                  WIDE: tl.constexpr, ACC: tl.constexpr):
    """The proximal step in an Adam step's metric of every block of a bucket (the formulas
    above). Tensor t's moment starts moment_offsets[t] elements after ``moments`` and has the
    weight's layout. FIT as for prox_kernel: 1 every group fits the tile (_metric_fused), 2
    none does (_metric_looped), 3 both, chosen per tensor."""
    for k in range(0, per_program):
        blk = tl.program_id(0) + k * tl.num_programs(0)
        if blk < num_blocks:
            t, outer, groups, inner, b, g0, p = _block(base, meta, blocks, num_blocks, blk,
                                                       BLOCK_G, BLOCK_I, VEC, OFF64)
            m_off = tl.load(moment_offsets + t)
            if VEC > 1:
                m_off = tl.multiple_of(m_off, VEC)
            q = moments + m_off + b.to(tl.int64) * outer * groups * inner
            gg = g0 + tl.arange(0, BLOCK_G)
            valid, l1, thr, le, exact = _tensor_params(meta, lams, t, WIDE)
            ok, s, eps, inv_lr = _metric_params(meta, metric, t, ACC)
            valid = valid & ok
            if FIT == 1:
                if valid:
                    _metric_fused(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps,
                                  inv_lr, BLOCK_O, BLOCK_I, DO_L1, DO_GROUP, DO_EXCL, WIDE, ACC)
            elif FIT == 2:
                if valid:
                    _metric_looped(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps,
                                   inv_lr, LOOP_O, BLOCK_G, LOOP_I, BLOCK_I, DO_L1, DO_GROUP,
                                   DO_EXCL, WIDE, ACC)
            else:
                if valid & (outer <= BLOCK_O) & (inner <= BLOCK_I):
                    _metric_fused(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps,
                                  inv_lr, BLOCK_O, BLOCK_I, DO_L1, DO_GROUP, DO_EXCL, WIDE, ACC)
                elif valid:
                    _metric_looped(p, q, outer, groups, inner, gg, l1, thr, le, exact, s, eps,
                                   inv_lr, LOOP_O, BLOCK_G, LOOP_I, BLOCK_I, DO_L1, DO_GROUP,
                                   DO_EXCL, WIDE, ACC)
