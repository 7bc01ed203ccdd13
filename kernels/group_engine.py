"""The Triton kernels behind every fastprox operator on CUDA: the GPU face of
csrc/cpu/group_engine.h, with the same per-group logic (ProxStep there, _group_params here).

A launch serves a *bucket*: one or more weights of one dtype, each seen through the layout of
kernels/layout.py, ``[batch][outer][groups][inner]`` of dense memory, group (b, g) being
``{x[b][o][g][i] : o < outer, i < inner}``. Every weight is addressed from the bucket's first
one (``base``) by an element offset in a per-tensor table, so one launch covers a whole model.
A program takes *blocks* (BLOCK_G neighbouring groups of one tensor) from a block table,
persistently, and keeps a tile of BLOCK_O x BLOCK_G x BLOCK_I elements in registers:

* one tile (a whole group fits the tile: rows up to 16K elements, 4K in float64, small
  columns): one read, sums and the exact exclusive Newton iteration on the registers, one
  write. The floor.
* looped (longer groups, columns of tall matrices): a statistics sweep over the group, Newton
  sweeps for the exact exclusive threshold, then a rewrite sweep that reads the group again
  (from L2 while the blocks in flight fit it), each over sub-tiles of at most 4K elements
  (LOOP_O x BLOCK_G x LOOP_I) with elementwise accumulators reduced once per sweep.
* split (few groups, each long: columns of 16384 x 4096): the outer dimension is cut into chunks
  taken by different programs. ``split_stats_kernel`` writes per-chunk partial sums, then
  ``split_apply_kernel`` folds them per group (in a fixed order: deterministic) and rewrites its
  chunk. Not for the exact exclusive threshold, whose Newton steps need the whole group.

What is compiled is decided on the host (kernels/launch.py, kernels/tiles.py) and checked without a GPU by
bench/compile_gate.py: FIT (one tile, looped, or both chosen per tensor) keeps each
specialization to the paths its bucket needs; tile sizes and warp counts bound the elements a
thread holds in registers (kernels/tiles.py: elems_per_thread), so nothing spills; no
subroutine is called (64-bit division, ``sqrt.rn``, ``div.rn.f64``: their calling convention
spills the tile, see _sqrt and _div); VEC > 1 tells the
compiler that the tile's contiguous run and the tensor's offset are multiples of 16 bytes
(``tl.multiple_of``), which gives 16-byte loads and stores; element offsets are int32 below
2**31 elements per tensor (OFF64 otherwise). Every integer argument is ``do_not_specialize``:
shapes and counts never cause a recompile.

Per group, with y = pre(x) (soft threshold by lam_l1 when taken), the rewrite is
``y * scale`` then ``sign * max(|.| - tau, 0)``:
    scale = 0 if ||y|| <= t else 1 - t/||y||             (group step, t = lam_group * c)
    tau   = lam_e * scale * ||y||_1                        (CGES's bound, exact=False)
    tau   : tau = lam_e * sum max(scale*|y| - tau, 0)      (exact: Newton from 0)
A sub-step whose lam is 0 is skipped; NaN groups become NaN; inf groups keep their values; a zero
group stays zero. Sums are in float32 for 16-bit weights (WIDE=False) and float64 for float64.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Columns of the int64 per-tensor table (kernels/tables.py fills it).
# The interpreter runs no PTX: _div falls back to the division it replaces.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"))

META_OFFSET = tl.constexpr(0)      # first element, counted from the bucket's base pointer
META_OUTER = tl.constexpr(1)
META_GROUPS = tl.constexpr(2)
META_INNER = tl.constexpr(3)
META_BLOCKS = tl.constexpr(4)      # blocks of BLOCK_G groups per batch entry
META_OUT = tl.constexpr(5)         # group_norms: index of the tensor's first norm in the output
META_C = tl.constexpr(6)           # c of the group threshold (sqrt(group size) or 1), float64 bits
META_EXACT = tl.constexpr(7)
META_CHUNKS = tl.constexpr(8)      # split: chunks of the outer dimension
META_LAM = tl.constexpr(9)         # row of the tensor's thresholds in the (T, 3) float64 table
META_COLS = tl.constexpr(10)


@triton.jit
def _copysign(mag, x, WIDE: tl.constexpr):
    """mag with the sign bit of x (keeps -0.0 and the sign of a NaN's neighbours, like C++)."""
    if WIDE:
        sign = x.to(tl.int64, bitcast=True) & (-9223372036854775807 - 1)
        return (mag.to(tl.int64, bitcast=True) | sign).to(tl.float64, bitcast=True)
    else:
        sign = x.to(tl.int32, bitcast=True) & (-2147483647 - 1)
        return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _shrink(y, tau, WIDE: tl.constexpr):
    """sign(y) * max(|y| - tau, 0), NaN in y or tau giving NaN."""
    d = tl.abs(y) - tau
    mag = tl.where(d > 0, d, tl.where(d == d, 0.0, d))
    return _copysign(mag, y, WIDE)


@triton.jit
def _sqrt(x, WIDE: tl.constexpr):
    """Square root of x >= 0 (or NaN) to within an ulp, without a call: the approximate
    reciprocal square root r, y = x r, then one correction y + (x - y y) r / 2 (exact residual by
    fma). ``sqrt.rn`` would be correctly rounded, but its slow path is a subroutine whose calling
    convention spills the tile's registers. 0 and inf are returned as they are."""
    if INTERPRETED:
        if WIDE:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)
    if WIDE:
        r = tl.inline_asm_elementwise("rsqrt.approx.ftz.f64 $0, $1;", "=d,d", [x],
                                      dtype=tl.float64, is_pure=True, pack=1)
        r = r * tl.fma(-0.5 * x * r, r, 1.5)  # Newton steps: 2^-22 -> 2^-44 -> 2^-88
        r = r * tl.fma(-0.5 * x * r, r, 1.5)
    else:
        r = tl.math.rsqrt(x)
    y = x * r
    y = tl.fma(tl.fma(-y, y, x), 0.5 * r, y)
    return tl.where((x == 0) | (x == float("inf")), x, y)


@triton.jit
def _div(a, b, WIDE: tl.constexpr):
    """a / b for the per-group math (a, b >= 0 or NaN). float32: Triton's division. float64:
    the fast path of IEEE division written out (a refined reciprocal, then one correction of the
    quotient: within an ulp of a / b, inf for b == 0 < a, 0 for b == inf), because
    ``div.rn.f64`` calls a subroutine whose calling convention spills the tile's registers."""
    if WIDE and not INTERPRETED:
        q = tl.inline_asm_elementwise(
            """{
            .reg .f64 r, t, q, e, nb;
            neg.f64 nb, $2;
            rcp.approx.ftz.f64 r, $2;
            fma.rn.f64 t, nb, r, 0d3FF0000000000000;
            fma.rn.f64 r, r, t, r;
            fma.rn.f64 t, nb, r, 0d3FF0000000000000;
            fma.rn.f64 r, r, t, r;
            mul.rn.f64 q, $1, r;
            fma.rn.f64 e, nb, q, $1;
            fma.rn.f64 $0, e, r, q;
            }""",
            "=d,d,d", [a, b], dtype=tl.float64, is_pure=True, pack=1)
        q = tl.where(b == float("inf"), 0.0, q)
        return tl.where(b == 0, tl.where(a > 0, float("inf"), float("nan")), q)
    else:
        return a / b


@triton.jit
def _inv(x, WIDE: tl.constexpr):
    return _div(tl.full(x.shape, 1.0, x.dtype), x, WIDE)


@triton.jit
def _valid(v):
    """A threshold the kernels may use: finite and >= 0 (the host checks it first; this guard
    keeps a weight untouched if an unchecked device threshold is not)."""
    return (v >= 0) & (v * 0 == 0)


@triton.jit
def _threshold_as(v, WIDE: tl.constexpr):
    """A float64 threshold in the accumulation type: in float32, one beyond its range becomes
    its largest value, not inf (an infinite element minus it stays infinite, an infinite norm
    is not <= it, every finite float32 value or norm is below it: the real threshold's
    results). Mirrors threshold_as of the CPU engine."""
    if WIDE:
        return v
    else:
        return tl.minimum(v, 3.4028234663852886e38).to(tl.float32)


@triton.jit
def _tensor_params(meta, lams, t, WIDE: tl.constexpr):
    """Thresholds of tensor t: (valid, l1, group threshold t = lam_group * c, lam_e, exact)."""
    row = meta + t * META_COLS
    lam_row = lams + tl.load(row + META_LAM) * 3
    l1 = tl.load(lam_row)
    lg = tl.load(lam_row + 1)
    le = tl.load(lam_row + 2)
    valid = _valid(l1) & _valid(lg) & _valid(le)
    c = tl.load(row + META_C).to(tl.float64, bitcast=True)
    exact = tl.load(row + META_EXACT) != 0
    return valid, _threshold_as(l1, WIDE), _threshold_as(lg * c, WIDE), _threshold_as(le, WIDE), \
        exact


@triton.jit
def _pre(x, l1, DO_L1: tl.constexpr, WIDE: tl.constexpr):
    if DO_L1:
        return _shrink(x, l1, WIDE)
    else:
        return x


@triton.jit
def _group_params(ss, sa, nz, thr, le, exact, DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr,
                  WIDE: tl.constexpr):
    """Per-group (scale, tau, active, iterate) from the sums of pre(x): ss (squares), sa (|.|),
    nz (count of nonzeros). Mirrors ProxStep::finish of the CPU engine."""
    scale = tl.full(ss.shape, 1.0, ss.dtype)
    if DO_GROUP:
        norm = _sqrt(ss, WIDE)
        # NaN norms give a NaN scale, inf norms 1, a zero group 0 without dividing by zero.
        shrunk = tl.where(norm <= thr, 0.0, 1.0 - _div(thr, norm, WIDE))
        scale = tl.where(thr > 0, shrunk, scale)
    tau = tl.zeros(ss.shape, ss.dtype)
    active = tl.zeros(ss.shape, ss.dtype)
    iterate = tau != tau  # all False
    if DO_EXCL:
        l1n = sa * scale  # ||.||_1 of the values the exclusive step sees
        is_nan = l1n != l1n
        dead = ((l1n * 0 != 0) & ~is_nan) | (scale == 0)  # inf group, or shrunk to zero
        first = tl.where(nz > 0, _div(l1n, _inv(le, WIDE) + nz, WIDE), 0.0)  # from tau = 0
        bound = tl.where(l1n > 0, le * l1n, 0.0)              # CGES's update
        on = le > 0
        tau = tl.where(exact, first, bound)
        tau = tl.where(is_nan, l1n, tl.where(dead, 0.0, tau))
        tau = tl.where(on, tau, 0.0)
        active = nz
        iterate = (nz > 0) & ~is_nan & ~dead
        iterate = tl.where(exact, iterate, False)
        iterate = tl.where(on, iterate, False)
    return scale, tau, active, iterate


@triton.jit
def _newton(tau, active, iterate, s_above, c_above, le, WIDE: tl.constexpr):
    """One Newton step of the exact exclusive threshold, from the sum and count of the
    magnitudes above tau. The active count strictly falls until the active set stops changing,
    which ends the iteration (at most n steps; a handful in practice)."""
    stop = ~(c_above < active) | (c_above == 0)
    step = iterate & ~stop
    tau = tl.where(step, tl.maximum(tau, _div(s_above, _inv(le, WIDE) + c_above, WIDE)), tau)
    active = tl.where(step, c_above, active)
    return tau, active, step


@triton.jit
def _block(base, meta, blocks, num_blocks, blk, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
           VEC: tl.constexpr, OFF64: tl.constexpr):
    """Block blk of a bucket: its tensor t, the tensor's (outer, groups, inner), the batch entry
    b, the index g0 of its first group, and the pointer p to element [b][0][0][0].

    Element offsets from p are int32 unless OFF64 (a tensor of 2**31 elements or more). With
    VEC > 1 the host has checked that the tensor's offset and its contiguous run (inner, or
    groups when inner == 1) are multiples of VEC elements and that base is 16-byte aligned, and
    the hints below let the compiler use 16-byte loads and stores."""
    t = tl.load(blocks + blk)
    local = tl.load(blocks + num_blocks + blk)
    row = meta + t * META_COLS
    offset = tl.load(row + META_OFFSET)
    outer = tl.load(row + META_OUTER)
    groups = tl.load(row + META_GROUPS)
    inner = tl.load(row + META_INNER)
    per_batch = tl.load(row + META_BLOCKS).to(tl.int32)  # int32: 64-bit division is a call
    b = local // per_batch
    if not OFF64:
        outer = outer.to(tl.int32)
        groups = groups.to(tl.int32)
        inner = inner.to(tl.int32)
    if VEC > 1:
        offset = tl.multiple_of(offset, VEC)
        if BLOCK_I == 1:
            groups = tl.multiple_of(groups, VEC)
        else:
            inner = tl.multiple_of(inner, VEC)
    g0 = (local % per_batch) * BLOCK_G
    p = base + offset + b.to(tl.int64) * outer * groups * inner
    return t, outer, groups, inner, b, g0, p


@triton.jit
def _load(ptrs, mask):
    """A masked load of weight elements. Streamed: cached in L2 only (.cg), which also marks the
    weight's loads in the PTX for the static checks of bench/compile_gate.py."""
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _tile(o, g, i, outer, groups, inner, BLOCK_I: tl.constexpr):
    """Element offsets (from p) and mask of the tile {[o][g][i]}: o (BO,1,1), g (1,BG,1),
    i (1,1,BI). With BLOCK_I == 1 the layout has inner == 1 (tile_shape never gives a 1 otherwise)
    and the contiguous axis is g."""
    mask = (o < outer) & (g < groups) & (i < inner)
    if BLOCK_I == 1:
        off = o * groups + g
    else:
        off = (o * groups + g) * inner + i
    return off, mask


@triton.jit
def _sums_loop(p, outer, groups, inner, g, l1, lo, li, LOOP_O: tl.constexpr,
               BLOCK_G: tl.constexpr, LOOP_I: tl.constexpr, BLOCK_I: tl.constexpr,
               DO_L1: tl.constexpr, DO_EXCL: tl.constexpr, WIDE: tl.constexpr,
               ACC: tl.constexpr):
    """Per-group sums of squares, |.| and nonzeros of pre(x), streamed in tiles of
    LOOP_O x BLOCK_G x LOOP_I elements, accumulated elementwise and reduced once."""
    ss = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
    sa = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
    nz = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
    for o0 in range(0, outer, LOOP_O):
        for i0 in range(0, inner, LOOP_I):
            off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
            y = _pre(_load(p + off, mask).to(ACC), l1, DO_L1, WIDE)
            ss += y * y
            if DO_EXCL:
                m = tl.abs(y)
                sa += m
                nz += (m > 0).to(ACC)
    return (tl.sum(tl.sum(ss, 2), 0), tl.sum(tl.sum(sa, 2), 0), tl.sum(tl.sum(nz, 2), 0))


@triton.jit
def _rewrite(y, scale, tau, DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr, WIDE: tl.constexpr):
    if DO_GROUP:
        y = y * scale[None, :, None]
    if DO_EXCL:
        y = _shrink(y, tau[None, :, None], WIDE)
    return y


@triton.jit
def _store_norms(norms, meta, t, b, groups, gg, ss, WIDE: tl.constexpr):
    out = norms + tl.load(meta + t * META_COLS + META_OUT) + b * groups + gg
    tl.store(out, _sqrt(ss, WIDE).to(norms.dtype.element_ty), mask=gg < groups)


@triton.jit
def _fused_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le, exact,
                 BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, DO_L1: tl.constexpr,
                 DO_GROUP: tl.constexpr, DO_EXCL: tl.constexpr, NORMS_ONLY: tl.constexpr,
                 WIDE: tl.constexpr, ACC: tl.constexpr):
    """Blocks whose groups fit the tile: one read into registers, the sums, the group scale and
    the exact exclusive threshold there (Newton steps over the registers), one write."""
    o = tl.arange(0, BLOCK_O)[:, None, None]
    i = tl.arange(0, BLOCK_I)[None, None, :]
    off, mask = _tile(o, gg[None, :, None], i, outer, groups, inner, BLOCK_I)
    y = _pre(_load(p + off, mask).to(ACC), l1, DO_L1, WIDE)
    ss = tl.sum(tl.sum(y * y, 2), 0)
    if NORMS_ONLY:
        _store_norms(norms, meta, t, b, groups, gg, ss, WIDE)
    else:
        sa = ss
        nz = ss
        if DO_EXCL:
            m = tl.abs(y)
            sa = tl.sum(tl.sum(m, 2), 0)
            nz = tl.sum(tl.sum((m > 0).to(ACC), 2), 0)
        scale, tau, active, iterate = _group_params(ss, sa, nz, thr, le, exact, DO_GROUP,
                                                    DO_EXCL, WIDE)
        if DO_EXCL:
            while tl.max(iterate.to(tl.int32), 0) > 0:
                ms = tl.abs(y) * scale[None, :, None]
                above = ms > tau[None, :, None]
                s_above = tl.sum(tl.sum(tl.where(above, ms, 0.0), 2), 0)
                c_above = tl.sum(tl.sum(above.to(ACC), 2), 0)
                tau, active, iterate = _newton(tau, active, iterate, s_above, c_above, le, WIDE)
        y = _rewrite(y, scale, tau, DO_GROUP, DO_EXCL, WIDE)
        tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _looped_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le, exact,
                  LOOP_O: tl.constexpr, BLOCK_G: tl.constexpr, LOOP_I: tl.constexpr,
                  BLOCK_I: tl.constexpr, DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                  DO_EXCL: tl.constexpr, NORMS_ONLY: tl.constexpr, WIDE: tl.constexpr,
                  ACC: tl.constexpr):
    """Blocks whose groups do not fit: a sums sweep, a sweep per Newton step of the exact
    exclusive threshold, then a rewrite sweep (the block's second read, from L2 while the blocks
    in flight fit it), each over LOOP_O x BLOCK_G x LOOP_I tiles."""
    lo = tl.arange(0, LOOP_O)[:, None, None]
    li = tl.arange(0, LOOP_I)[None, None, :]
    g = gg[None, :, None]
    zero = tl.zeros((BLOCK_G,), ACC)
    ss = zero
    sa = zero
    nz = zero
    if DO_GROUP or DO_EXCL or NORMS_ONLY:
        ss, sa, nz = _sums_loop(p, outer, groups, inner, g, l1, lo, li, LOOP_O, BLOCK_G, LOOP_I,
                                BLOCK_I, DO_L1, DO_EXCL, WIDE, ACC)
    if NORMS_ONLY:
        _store_norms(norms, meta, t, b, groups, gg, ss, WIDE)
    else:
        scale, tau, active, iterate = _group_params(ss, sa, nz, thr, le, exact, DO_GROUP,
                                                    DO_EXCL, WIDE)
        if DO_EXCL:
            while tl.max(iterate.to(tl.int32), 0) > 0:
                s_t = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                c_t = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
                for o0 in range(0, outer, LOOP_O):
                    for i0 in range(0, inner, LOOP_I):
                        off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                        x = _load(p + off, mask).to(ACC)
                        ms = tl.abs(_pre(x, l1, DO_L1, WIDE)) * scale[None, :, None]
                        above = ms > tau[None, :, None]
                        s_t += tl.where(above, ms, 0.0)
                        c_t += above.to(ACC)
                tau, active, iterate = _newton(tau, active, iterate, tl.sum(tl.sum(s_t, 2), 0),
                                               tl.sum(tl.sum(c_t, 2), 0), le, WIDE)
        for o0 in range(0, outer, LOOP_O):
            for i0 in range(0, inner, LOOP_I):
                off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                y = _pre(_load(p + off, mask).to(ACC), l1, DO_L1, WIDE)
                y = _rewrite(y, scale, tau, DO_GROUP, DO_EXCL, WIDE)
                tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_blocks", "per_program"])
def prox_kernel(base, meta, lams, blocks, norms, num_blocks, per_program,
                BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                LOOP_O: tl.constexpr, LOOP_I: tl.constexpr, FIT: tl.constexpr,
                VEC: tl.constexpr, OFF64: tl.constexpr,
                DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                DO_EXCL: tl.constexpr, NORMS_ONLY: tl.constexpr, WIDE: tl.constexpr,
                ACC: tl.constexpr):
    """One proximal step (or, NORMS_ONLY, the group norms) of every block of a bucket.

    FIT: 1 every tensor's groups fit the BLOCK_O x BLOCK_G x BLOCK_I tile (_fused_group), 2 none
    does (_looped_group), 3 some do: both, chosen per tensor. Only the paths a bucket needs are
    compiled, so each holds in registers only what it uses."""
    # Persistent: program p takes blocks p, p + grid, p + 2 grid, ...
    for k in range(0, per_program):
        blk = tl.program_id(0) + k * tl.num_programs(0)
        if blk < num_blocks:
            t, outer, groups, inner, b, g0, p = _block(base, meta, blocks, num_blocks, blk,
                                                       BLOCK_G, BLOCK_I, VEC, OFF64)
            gg = g0 + tl.arange(0, BLOCK_G)
            valid, l1, thr, le, exact = _tensor_params(meta, lams, t, WIDE)
            if FIT == 1:
                if valid:
                    _fused_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le,
                                 exact, BLOCK_O, BLOCK_I, DO_L1, DO_GROUP, DO_EXCL, NORMS_ONLY,
                                 WIDE, ACC)
            elif FIT == 2:
                if valid:
                    _looped_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le,
                                  exact, LOOP_O, BLOCK_G, LOOP_I, BLOCK_I, DO_L1, DO_GROUP,
                                  DO_EXCL, NORMS_ONLY, WIDE, ACC)
            else:
                if valid & (outer <= BLOCK_O) & (inner <= BLOCK_I):
                    _fused_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le,
                                 exact, BLOCK_O, BLOCK_I, DO_L1, DO_GROUP, DO_EXCL, NORMS_ONLY,
                                 WIDE, ACC)
                elif valid:
                    _looped_group(p, meta, norms, t, b, outer, groups, inner, gg, l1, thr, le,
                                  exact, LOOP_O, BLOCK_G, LOOP_I, BLOCK_I, DO_L1, DO_GROUP,
                                  DO_EXCL, NORMS_ONLY, WIDE, ACC)


@triton.jit
def _split_tile(base, meta, lams, blocks, num_blocks, blk, chunk, BLOCK_O: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr, VEC: tl.constexpr,
                OFF64: tl.constexpr, WIDE: tl.constexpr):
    """Chunk `chunk` (BLOCK_O rows of the outer dimension) of block blk: its tensor t, pointers,
    mask, and the tensor's thresholds (_tensor_params)."""
    t, outer, groups, inner, b, g0, p = _block(base, meta, blocks, num_blocks, blk, BLOCK_G,
                                               BLOCK_I, VEC, OFF64)
    g = g0 + tl.arange(0, BLOCK_G)[None, :, None]
    o = chunk * BLOCK_O + tl.arange(0, BLOCK_O)[:, None, None]
    i = tl.arange(0, BLOCK_I)[None, None, :]
    off, mask = _tile(o, g, i, outer, groups, inner, BLOCK_I)
    valid, l1, thr, le, exact = _tensor_params(meta, lams, t, WIDE)
    return t, p + off, mask, valid, l1, thr, le


@triton.jit(do_not_specialize=["num_blocks", "max_chunks"])
def split_stats_kernel(base, meta, lams, blocks, partial, num_blocks, max_chunks,
                       BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                       VEC: tl.constexpr, OFF64: tl.constexpr,
                       DO_L1: tl.constexpr, DO_EXCL: tl.constexpr, WIDE: tl.constexpr,
                       ACC: tl.constexpr):
    """Split path, first launch: partial sums (squares, |.|, nonzeros) of one chunk of BLOCK_O
    outer rows of a block, into partial[blk, chunk, 3, BLOCK_G]. Grid: (num_blocks, max_chunks)."""
    blk = tl.program_id(0)
    chunk = tl.program_id(1)
    t, ptrs, mask, valid, l1, thr, le = _split_tile(base, meta, lams, blocks, num_blocks, blk,
                                                    chunk, BLOCK_O, BLOCK_G, BLOCK_I, VEC, OFF64,
                                                    WIDE)
    y = _pre(_load(ptrs, mask).to(ACC), l1, DO_L1, WIDE)
    slot = partial + ((blk * max_chunks + chunk) * 3) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(slot, tl.sum(tl.sum(y * y, 2), 0))
    if DO_EXCL:
        m = tl.abs(y)
        tl.store(slot + BLOCK_G, tl.sum(tl.sum(m, 2), 0))
        tl.store(slot + 2 * BLOCK_G, tl.sum(tl.sum((m > 0).to(ACC), 2), 0))


@triton.jit(do_not_specialize=["num_blocks", "max_chunks"])
def split_apply_kernel(base, meta, lams, blocks, partial, num_blocks, max_chunks,
                       BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                       VEC: tl.constexpr, OFF64: tl.constexpr,
                       CHUNKS_P2: tl.constexpr, DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                       DO_EXCL: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """Split path, second launch: folds the partial sums of the block's groups over its chunks
    (the same order in every program, so every chunk gets the same scale), then rewrites its own
    chunk. Grid: (num_blocks, max_chunks), run in reverse so the chunks read last come first."""
    blk = num_blocks - 1 - tl.program_id(0)
    chunk = max_chunks - 1 - tl.program_id(1)
    t, ptrs, mask, valid, l1, thr, le = _split_tile(base, meta, lams, blocks, num_blocks, blk,
                                                    chunk, BLOCK_O, BLOCK_G, BLOCK_I, VEC, OFF64,
                                                    WIDE)
    chunks = tl.load(meta + t * META_COLS + META_CHUNKS)
    g_idx = tl.arange(0, BLOCK_G)
    if valid & (chunk < chunks):
        ss = tl.zeros((CHUNKS_P2, BLOCK_G), ACC)
        sa = ss
        nz = ss
        for c0 in range(0, chunks, CHUNKS_P2):
            c_idx = c0 + tl.arange(0, CHUNKS_P2)[:, None]
            slots = partial + ((blk * max_chunks + c_idx) * 3) * BLOCK_G + g_idx[None, :]
            used = c_idx < chunks
            ss += tl.load(slots, mask=used, other=0.0)
            if DO_EXCL:
                sa += tl.load(slots + BLOCK_G, mask=used, other=0.0)
                nz += tl.load(slots + 2 * BLOCK_G, mask=used, other=0.0)
        exact = valid & ~valid  # the split path serves the bound only (module docstring)
        scale, tau, active, iterate = _group_params(tl.sum(ss, 0), tl.sum(sa, 0), tl.sum(nz, 0),
                                                    thr, le, exact, DO_GROUP, DO_EXCL, WIDE)
        y = _pre(_load(ptrs, mask).to(ACC), l1, DO_L1, WIDE)
        y = _rewrite(y, scale, tau, DO_GROUP, DO_EXCL, WIDE)
        tl.store(ptrs, y.to(base.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["numel_vec"])
def soft_threshold_kernel(ptr, numel_vec, lams, BLOCK: tl.constexpr, VEC: tl.constexpr,
                          WIDE: tl.constexpr, ACC: tl.constexpr):
    """w <- sign(w) * max(|w| - lam, 0) over the memory span of a dense weight of
    numel_vec * VEC elements. With VEC > 1 the host has checked that ptr is 16-byte aligned:
    16-byte accesses (the mask is constant over each VEC elements)."""
    lam = tl.load(lams)
    if _valid(lam):
        n = numel_vec.to(tl.int64) * VEC
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = _load(ptr + offs, mask).to(ACC)
        tl.store(ptr + offs, _shrink(x, _threshold_as(lam, WIDE), WIDE).to(ptr.dtype.element_ty),
                 mask=mask)


# The phases of a step whose groups lie in several places (fastprox/_phases.py, kernels/
# group_phases.py): per-group sums, sums above a threshold, and a rewrite with given per-group
# values, over the same blocks and tables as prox_kernel.
PHASE_SUMS = tl.constexpr(1)    # out rows: sum of y^2, sum of |y|, count of |y| > 0
PHASE_ABOVE = tl.constexpr(2)   # out rows: sum and count of m = |y| * scale_g above tau_g
PHASE_REWRITE = tl.constexpr(3)  # x <- shrink(y * scale_g, tau_g)


@triton.jit(do_not_specialize=["num_blocks", "per_program", "stride"])
def phase_kernel(base, meta, l1s, blocks, params, out, num_blocks, per_program, stride,
                 LOOP_O: tl.constexpr, BLOCK_G: tl.constexpr, LOOP_I: tl.constexpr,
                 BLOCK_I: tl.constexpr, VEC: tl.constexpr, OFF64: tl.constexpr,
                 PHASE: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """One phase over every block of a bucket, with y = soft(x, l1) (l1 = l1s[tensor's row]):

        PHASE_SUMS     out[0|1|2, g] = sum y^2, sum |y|, count(|y| > 0)
        PHASE_ABOVE    out[0|1, g] = sum and count of the m = |y| * scale_g with m > tau_g
        PHASE_REWRITE  x <- sign(y) * max(|y| * scale_g - tau_g, 0)   (written in place)

    with scale_g = params[0, g], tau_g = params[1, g] (the host fills 1 and 0 where a step has
    none: y * 1 and a shrink by 0 leave y as it is, so one specialization serves every
    combination). Group g of tensor t at batch b is slot META_OUT + b * groups + g of the rows
    (``stride`` slots a row). Each block sweeps its groups in LOOP_O x BLOCK_G x LOOP_I tiles
    (one read; the rewrite: one read and one write), with elementwise accumulators reduced once:
    the sums' order is fixed by the specialization (deterministic)."""
    for k in range(0, per_program):
        blk = tl.program_id(0) + k * tl.num_programs(0)
        if blk < num_blocks:
            t, outer, groups, inner, b, g0, p = _block(base, meta, blocks, num_blocks, blk,
                                                       BLOCK_G, BLOCK_I, VEC, OFF64)
            row = meta + t * META_COLS
            gg = g0 + tl.arange(0, BLOCK_G)
            gmask = gg < groups
            slot = tl.load(row + META_OUT) + b * groups + gg
            l1 = _threshold_as(tl.load(l1s + tl.load(row + META_LAM)), WIDE)
            scale = tl.full((BLOCK_G,), 1.0, ACC)
            tau = tl.zeros((BLOCK_G,), ACC)
            if PHASE != PHASE_SUMS:
                scale = tl.load(params + slot, mask=gmask, other=1.0).to(ACC)
                tau = tl.load(params + stride + slot, mask=gmask, other=0.0).to(ACC)
            lo = tl.arange(0, LOOP_O)[:, None, None]
            li = tl.arange(0, LOOP_I)[None, None, :]
            g = gg[None, :, None]
            s0 = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
            s1 = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
            s2 = tl.zeros((LOOP_O, BLOCK_G, LOOP_I), ACC)
            for o0 in range(0, outer, LOOP_O):
                for i0 in range(0, inner, LOOP_I):
                    off, mask = _tile(o0 + lo, g, i0 + li, outer, groups, inner, BLOCK_I)
                    y = _shrink(_load(p + off, mask).to(ACC), l1, WIDE)
                    if PHASE == PHASE_SUMS:
                        m = tl.abs(y)
                        s0 += y * y
                        s1 += m
                        s2 += (m > 0).to(ACC)
                    elif PHASE == PHASE_ABOVE:
                        m = tl.abs(y) * scale[None, :, None]
                        above = (m > tau[None, :, None]) & mask
                        s1 += tl.where(above, m, 0.0)
                        s2 += above.to(ACC)
                    else:
                        y = _shrink(y * scale[None, :, None], tau[None, :, None], WIDE)
                        tl.store(p + off, y.to(p.dtype.element_ty), mask=mask)
            if PHASE == PHASE_SUMS:
                tl.store(out + slot, tl.sum(tl.sum(s0, 2), 0), mask=gmask)
                tl.store(out + stride + slot, tl.sum(tl.sum(s1, 2), 0), mask=gmask)
                tl.store(out + 2 * stride + slot, tl.sum(tl.sum(s2, 2), 0), mask=gmask)
            elif PHASE == PHASE_ABOVE:
                tl.store(out + slot, tl.sum(tl.sum(s1, 2), 0), mask=gmask)
                tl.store(out + stride + slot, tl.sum(tl.sum(s2, 2), 0), mask=gmask)


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
def _metric_load(p, q, off, mask, l1, s, eps, inv_lr, DO_L1: tl.constexpr, WIDE: tl.constexpr,
                 ACC: tl.constexpr):
    """(y, d) of a tile: d = (sqrt(v s) + eps) / lr (0 outside the mask) and y the weight after
    the metric soft threshold by l1 / d (an element with d = 0 becomes 0, NaN stays NaN;
    l1 == 0: the weight as it is)."""
    x = _load(p + off, mask).to(ACC)
    v = _load(q + off, mask).to(ACC)
    d = tl.where(mask, (_sqrt(v * s, WIDE) + eps) * inv_lr, 0.0)
    y = x
    if DO_L1:
        # l1 / d is finite for d > 0: an infinite x stays infinite where the quotient overflows
        infinite = (x * 0 != 0) & (x == x)
        soft = tl.where(d > 0, tl.where(infinite, x, _shrink(x, l1 * _inv(d, WIDE), WIDE)),
                        tl.where(x != x, x, 0.0))
        y = tl.where(l1 > 0, soft, x)
    return y, d


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
    zero = tl.zeros((BLOCK_G,), ACC)
    nan_g = zero != zero
    bad = nan_g
    theta = zero
    keep = nan_g
    skip = ~nan_g
    S = zero
    skip_e = ~nan_g
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
