"""The device helpers every Triton kernel of fastprox shares (kernels/prox_kernels.py,
kernels/phase_kernels.py, kernels/metric_kernels.py): the columns of the per-tensor table, the
IEEE square root and division without a subroutine call (whose calling convention spills the
tile: _sqrt, _div), copysign and shrink with NaN kept, the checks of a threshold, and the
addressing of a bucket's blocks and tiles (kernels/layout.py: ``[batch][outer][groups][inner]``
of dense memory, every weight addressed from the bucket's first one by an element offset).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter runs no PTX: _div falls back to the division it replaces.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"))

# Columns of the int64 per-tensor table (kernels/tables.py fills it).
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
