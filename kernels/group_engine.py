"""The Triton kernels behind every fastprox operator on CUDA: the GPU face of
csrc/cpu/group_engine.h, with the same per-group logic (ProxStep there, _group_params here).

A launch serves a *bucket*: one or more weights of one dtype, each seen through the layout of
kernels/layout.py, ``[batch][outer][groups][inner]`` of dense memory, group (b, g) being
``{x[b][o][g][i] : o < outer, i < inner}``. Every weight is addressed from the bucket's first
one (``base``) by an element offset in a per-tensor table, so one launch covers a whole model.
A program takes *blocks* (BLOCK_G neighbouring groups of one tensor) from a block table,
persistently, and keeps a tile of BLOCK_O x BLOCK_G x BLOCK_I elements in registers:

* one tile (a whole group fits the tile: rows up to 16K elements, small columns): one read,
  sums and the exact exclusive Newton iteration on the registers, one write. The floor.
* looped (longer groups, columns of tall matrices): a statistics sweep over the group, Newton
  sweeps for the exact exclusive threshold, then a rewrite sweep that reads the group again
  (from L2 while the blocks in flight fit it).
* split (few groups, each long: columns of 16384 x 4096): the outer dimension is cut into chunks
  taken by different programs. ``split_stats_kernel`` writes per-chunk partial sums, then
  ``split_apply_kernel`` folds them per group (in a fixed order: deterministic) and rewrites its
  chunk. Not for the exact exclusive threshold, whose Newton steps need the whole group.

Per group, with y = pre(x) (soft threshold by lam_l1 when taken), the rewrite is
``y * scale`` then ``sign * max(|.| - tau, 0)``:
    scale = 0 if ||y|| <= t else 1 - t/||y||             (group step, t = lam_group * c)
    tau   = lam_e * scale * ||y||_1                        (CGES's bound, exact=False)
    tau   : tau = lam_e * sum max(scale*|y| - tau, 0)      (exact: Newton from 0)
A sub-step whose lam is 0 is skipped; NaN groups become NaN; inf groups keep their values; a zero
group stays zero. Sums are in float32 for 16-bit weights (WIDE=False) and float64 for float64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the int64 per-tensor table (kernels/launch.py fills it).
META_OFFSET = 0      # first element, counted from the bucket's base pointer
META_OUTER = 1
META_GROUPS = 2
META_INNER = 3
META_BLOCKS = 4      # blocks of BLOCK_G groups per batch entry
META_OUT = 5         # group_norms: index of the tensor's first norm in the output
META_SIZE_WEIGHTED = 6
META_EXACT = 7
META_CHUNKS = 8      # split: chunks of the outer dimension
META_LAM = 9         # row of the tensor's thresholds in the (T, 3) float64 table
META_COLS = 10


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
    """Correctly rounded square root (tl.sqrt is approximate in float32)."""
    if WIDE:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _valid(v):
    """A threshold the kernels may use: finite and >= 0 (the host checks it first; this guard
    keeps a weight untouched if an unchecked device threshold is not)."""
    return (v >= 0) & (v * 0 == 0)


@triton.jit
def _tensor_params(meta, lams, t, ACC: tl.constexpr):
    """Thresholds of tensor t: (valid, l1, group threshold t = lam_group * c, lam_e, exact)."""
    row = meta + t * META_COLS
    n = tl.load(row + META_OUTER) * tl.load(row + META_INNER)
    lam_row = lams + tl.load(row + META_LAM) * 3
    l1 = tl.load(lam_row)
    lg = tl.load(lam_row + 1)
    le = tl.load(lam_row + 2)
    valid = _valid(l1) & _valid(lg) & _valid(le)
    c = tl.where(tl.load(row + META_SIZE_WEIGHTED) != 0, tl.sqrt(n.to(tl.float64)), 1.0)
    exact = tl.load(row + META_EXACT) != 0
    return valid, l1.to(ACC), (lg * c).to(ACC), le.to(ACC), exact


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
        shrunk = tl.where(norm <= thr, 0.0, 1.0 - thr / norm)
        scale = tl.where(thr > 0, shrunk, scale)
    tau = tl.zeros(ss.shape, ss.dtype)
    active = tl.zeros(ss.shape, ss.dtype)
    iterate = tau != tau  # all False
    if DO_EXCL:
        l1n = sa * scale  # ||.||_1 of the values the exclusive step sees
        is_nan = l1n != l1n
        dead = ((l1n * 0 != 0) & ~is_nan) | (scale == 0)  # inf group, or shrunk to zero
        first = tl.where(nz > 0, l1n / (1.0 / le + nz), 0.0)  # first Newton step from tau = 0
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
def _newton(tau, active, iterate, s_above, c_above, le):
    """One Newton step of the exact exclusive threshold, from the sum and count of the
    magnitudes above tau. The active count strictly falls until the active set stops changing,
    which ends the iteration (at most n steps; a handful in practice)."""
    stop = ~(c_above < active) | (c_above == 0)
    step = iterate & ~stop
    tau = tl.where(step, tl.maximum(tau, s_above / (1.0 / le + c_above)), tau)
    active = tl.where(step, c_above, active)
    return tau, active, step


@triton.jit
def _block(base, meta, blocks, num_blocks, blk, g_idx, BLOCK_G: tl.constexpr):
    """Block blk of a bucket: its tensor t, the tensor's (outer, groups, inner), the batch entry
    b, the indices gg of its groups, and the pointer p to element [b][0][0][0]."""
    t = tl.load(blocks + blk)
    local = tl.load(blocks + num_blocks + blk)
    row = meta + t * META_COLS
    outer = tl.load(row + META_OUTER)
    groups = tl.load(row + META_GROUPS)
    inner = tl.load(row + META_INNER)
    per_batch = tl.load(row + META_BLOCKS)
    b = local // per_batch
    gg = (local % per_batch) * BLOCK_G + g_idx
    p = base + tl.load(row + META_OFFSET) + b * (outer * groups * inner)
    return t, outer, groups, inner, b, gg, p


@triton.jit
def prox_kernel(base, meta, lams, blocks, norms, num_blocks, per_program,
                BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                DO_EXCL: tl.constexpr, NORMS_ONLY: tl.constexpr, WIDE: tl.constexpr,
                ACC: tl.constexpr):
    """One proximal step (or, NORMS_ONLY, the group norms) of every block of a bucket."""
    NEED_SUMS: tl.constexpr = DO_GROUP or DO_EXCL or NORMS_ONLY
    o_idx = tl.arange(0, BLOCK_O)[:, None, None]
    g_idx = tl.arange(0, BLOCK_G)
    i_idx = tl.arange(0, BLOCK_I)[None, None, :]
    # Persistent: program p takes blocks p, p + grid, p + 2 grid, ...
    for k in range(0, per_program):
        blk = tl.program_id(0) + k * tl.num_programs(0)
        if blk < num_blocks:
            t, outer, groups, inner, b, gg, p = _block(base, meta, blocks, num_blocks, blk,
                                                       g_idx, BLOCK_G)
            row = meta + t * META_COLS
            g = gg[None, :, None]
            row_stride = groups * inner
            valid, l1, thr, le, exact = _tensor_params(meta, lams, t, ACC)
            if valid:
                if (outer <= BLOCK_O) & (inner <= BLOCK_I):  # the whole group in registers
                    mask = (o_idx < outer) & (g < groups) & (i_idx < inner)
                    ptrs = p + o_idx * row_stride + g * inner + i_idx
                    y = _pre(tl.load(ptrs, mask=mask, other=0.0).to(ACC), l1, DO_L1, WIDE)
                    ss = tl.sum(tl.sum(y * y, 2), 0)
                    if NORMS_ONLY:
                        out = norms + tl.load(row + META_OUT) + b * groups + gg
                        tl.store(out, _sqrt(ss, WIDE).to(norms.dtype.element_ty), mask=gg < groups)
                    else:
                        m = tl.abs(y)
                        sa = tl.sum(tl.sum(m, 2), 0)
                        nz = tl.sum(tl.sum((m > 0).to(ACC), 2), 0)
                        scale, tau, active, iterate = _group_params(ss, sa, nz, thr, le, exact,
                                                                    DO_GROUP, DO_EXCL, WIDE)
                        if DO_EXCL:
                            ms = m * scale[None, :, None]
                            while tl.max(iterate.to(tl.int32), 0) > 0:
                                above = ms > tau[None, :, None]
                                s_above = tl.sum(tl.sum(tl.where(above, ms, 0.0), 2), 0)
                                c_above = tl.sum(tl.sum(above.to(ACC), 2), 0)
                                tau, active, iterate = _newton(tau, active, iterate, s_above,
                                                               c_above, le)
                        if DO_GROUP:
                            y = y * scale[None, :, None]
                        if DO_EXCL:
                            y = _shrink(y, tau[None, :, None], WIDE)
                        tl.store(ptrs, y.to(base.dtype.element_ty), mask=mask)
                else:
                    zero = tl.zeros((BLOCK_G,), ACC)
                    ss = zero
                    sa = zero
                    nz = zero
                    if NEED_SUMS:
                        for o0 in range(0, outer, BLOCK_O):
                            for i0 in range(0, inner, BLOCK_I):
                                o = o0 + o_idx
                                i = i0 + i_idx
                                mask = (o < outer) & (g < groups) & (i < inner)
                                x = tl.load(p + o * row_stride + g * inner + i, mask=mask,
                                            other=0.0)
                                y = _pre(x.to(ACC), l1, DO_L1, WIDE)
                                ss += tl.sum(tl.sum(y * y, 2), 0)
                                if DO_EXCL:
                                    m = tl.abs(y)
                                    sa += tl.sum(tl.sum(m, 2), 0)
                                    nz += tl.sum(tl.sum((m > 0).to(ACC), 2), 0)
                    if NORMS_ONLY:
                        out = norms + tl.load(row + META_OUT) + b * groups + gg
                        tl.store(out, _sqrt(ss, WIDE).to(norms.dtype.element_ty), mask=gg < groups)
                    else:
                        scale, tau, active, iterate = _group_params(ss, sa, nz, thr, le, exact,
                                                                    DO_GROUP, DO_EXCL, WIDE)
                        if DO_EXCL:
                            while tl.max(iterate.to(tl.int32), 0) > 0:
                                s_above = zero
                                c_above = zero
                                for o0 in range(0, outer, BLOCK_O):
                                    for i0 in range(0, inner, BLOCK_I):
                                        o = o0 + o_idx
                                        i = i0 + i_idx
                                        mask = (o < outer) & (g < groups) & (i < inner)
                                        x = tl.load(p + o * row_stride + g * inner + i, mask=mask,
                                                    other=0.0)
                                        ms = tl.abs(_pre(x.to(ACC), l1, DO_L1, WIDE))
                                        ms = ms * scale[None, :, None]
                                        above = ms > tau[None, :, None]
                                        s_above += tl.sum(tl.sum(tl.where(above, ms, 0.0), 2), 0)
                                        c_above += tl.sum(tl.sum(above.to(ACC), 2), 0)
                                tau, active, iterate = _newton(tau, active, iterate, s_above,
                                                               c_above, le)
                        for o0 in range(0, outer, BLOCK_O):
                            for i0 in range(0, inner, BLOCK_I):
                                o = o0 + o_idx
                                i = i0 + i_idx
                                mask = (o < outer) & (g < groups) & (i < inner)
                                ptrs = p + o * row_stride + g * inner + i
                                y = _pre(tl.load(ptrs, mask=mask, other=0.0).to(ACC), l1, DO_L1,
                                         WIDE)
                                if DO_GROUP:
                                    y = y * scale[None, :, None]
                                if DO_EXCL:
                                    y = _shrink(y, tau[None, :, None], WIDE)
                                tl.store(ptrs, y.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _split_tile(base, meta, lams, blocks, num_blocks, blk, chunk, BLOCK_O: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr, ACC: tl.constexpr):
    """Chunk `chunk` (BLOCK_O rows of the outer dimension) of block blk: its tensor t, pointers,
    mask, and the tensor's thresholds (_tensor_params)."""
    g_idx = tl.arange(0, BLOCK_G)
    t, outer, groups, inner, b, gg, p = _block(base, meta, blocks, num_blocks, blk, g_idx,
                                               BLOCK_G)
    g = gg[None, :, None]
    o = chunk * BLOCK_O + tl.arange(0, BLOCK_O)[:, None, None]
    i = tl.arange(0, BLOCK_I)[None, None, :]
    mask = (o < outer) & (g < groups) & (i < inner)
    valid, l1, thr, le, exact = _tensor_params(meta, lams, t, ACC)
    return t, p + o * (groups * inner) + g * inner + i, mask, valid, l1, thr, le


@triton.jit
def split_stats_kernel(base, meta, lams, blocks, partial, num_blocks, max_chunks,
                       BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                       DO_L1: tl.constexpr, DO_EXCL: tl.constexpr, WIDE: tl.constexpr,
                       ACC: tl.constexpr):
    """Split path, first launch: partial sums (squares, |.|, nonzeros) of one chunk of BLOCK_O
    outer rows of a block, into partial[blk, chunk, 3, BLOCK_G]. Grid: (num_blocks, max_chunks)."""
    blk = tl.program_id(0)
    chunk = tl.program_id(1)
    t, ptrs, mask, valid, l1, thr, le = _split_tile(base, meta, lams, blocks, num_blocks, blk,
                                                    chunk, BLOCK_O, BLOCK_G, BLOCK_I, ACC)
    y = _pre(tl.load(ptrs, mask=mask, other=0.0).to(ACC), l1, DO_L1, WIDE)
    m = tl.abs(y)
    slot = partial + ((blk * max_chunks + chunk) * 3) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(slot, tl.sum(tl.sum(y * y, 2), 0))
    if DO_EXCL:
        tl.store(slot + BLOCK_G, tl.sum(tl.sum(m, 2), 0))
        tl.store(slot + 2 * BLOCK_G, tl.sum(tl.sum((m > 0).to(ACC), 2), 0))


@triton.jit
def split_apply_kernel(base, meta, lams, blocks, partial, num_blocks, max_chunks,
                       BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
                       CHUNKS_P2: tl.constexpr, DO_L1: tl.constexpr, DO_GROUP: tl.constexpr,
                       DO_EXCL: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr):
    """Split path, second launch: folds the partial sums of the block's groups over its chunks
    (the same order in every program, so every chunk gets the same scale), then rewrites its own
    chunk. Grid: (num_blocks, max_chunks), run in reverse so the chunks read last come first."""
    blk = num_blocks - 1 - tl.program_id(0)
    chunk = max_chunks - 1 - tl.program_id(1)
    t, ptrs, mask, valid, l1, thr, le = _split_tile(base, meta, lams, blocks, num_blocks, blk,
                                                    chunk, BLOCK_O, BLOCK_G, BLOCK_I, ACC)
    chunks = tl.load(meta + t * META_COLS + META_CHUNKS)
    g_idx = tl.arange(0, BLOCK_G)
    if valid & (chunk < chunks):
        ss = tl.zeros((BLOCK_G,), ACC)
        sa = ss
        nz = ss
        for c0 in range(0, chunks, CHUNKS_P2):
            c_idx = c0 + tl.arange(0, CHUNKS_P2)[:, None]
            slots = partial + ((blk * max_chunks + c_idx) * 3) * BLOCK_G + g_idx[None, :]
            used = c_idx < chunks
            ss += tl.sum(tl.load(slots, mask=used, other=0.0), 0)
            if DO_EXCL:
                sa += tl.sum(tl.load(slots + BLOCK_G, mask=used, other=0.0), 0)
                nz += tl.sum(tl.load(slots + 2 * BLOCK_G, mask=used, other=0.0), 0)
        exact = valid & ~valid  # the split path serves the bound only (module docstring)
        scale, tau, active, iterate = _group_params(ss, sa, nz, thr, le, exact, DO_GROUP,
                                                    DO_EXCL, WIDE)
        y = _pre(tl.load(ptrs, mask=mask, other=0.0).to(ACC), l1, DO_L1, WIDE)
        if DO_GROUP:
            y = y * scale[None, :, None]
        if DO_EXCL:
            y = _shrink(y, tau[None, :, None], WIDE)
        tl.store(ptrs, y.to(base.dtype.element_ty), mask=mask)


@triton.jit
def soft_threshold_kernel(ptr, numel, lams, BLOCK: tl.constexpr, WIDE: tl.constexpr,
                          ACC: tl.constexpr):
    """w <- sign(w) * max(|w| - lam, 0) over the memory span of a dense weight."""
    lam = tl.load(lams)
    if _valid(lam):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(ptr + offs, _shrink(x, lam.to(ACC), WIDE).to(ptr.dtype.element_ty), mask=mask)
