"""The Triton kernels of the fused step on CUDA (prox_kernel, the split kernels,
soft_threshold_kernel), behind every in-place operator and group_norms: the GPU face of
csrc/cpu/group_engine.h and group_steps.h, with the same per-group logic (ProxStep there,
_group_params here).

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

What is compiled is decided on the host (kernels/launch.py, kernels/tiles.py) and checked
without a GPU by bench/compile_gate.py: FIT (one tile, looped, or both chosen per tensor) keeps each
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

import triton
import triton.language as tl

from .tile_ops import (_shrink, _sqrt, _div, _inv, _valid, _threshold_as, _tensor_params, _block,
                       _load, _tile, META_OUT, META_CHUNKS, META_COLS)


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
