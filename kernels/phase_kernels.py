"""The Triton kernel of the phases of a step whose groups lie in several places
(fastprox/_phases.py, kernels/group_phases.py: coupled groups across tensors, groups across
shards): per-group sums, sums above a threshold, and a rewrite with given per-group values, over
the same blocks and tables as prox_kernel (kernels/prox_kernels.py); y = soft(x, lam_l1) per
tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_ops import META_COLS, META_LAM, META_OUT, _block, _load, _shrink, _threshold_as, _tile

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
