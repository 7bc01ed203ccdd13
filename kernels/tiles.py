"""Tiles and tuning of the CUDA kernels, on the host: how many elements a program holds in
registers (per dtype, access width and offset width, so that nothing spills: checked for every
specialization by bench/compile_gate.py), the tile shape of a layout, the 16-byte accesses a
weight allows, the warp counts a kernel may run with, and the tuning that picks among them
(timed once per key). Also the device facts the plans read: the interpreter, graph capture, the
number of SMs, addresses.
"""

from __future__ import annotations

import os

import torch
import triton

from .layout import GroupLayout

# Set by triton too; read once here, as triton does at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

TILE_ELEMS = 4096         # elements of a row-like tile (several rows per program when short)
ONE_TILE_ELEMS = 16384    # a group up to this size is kept in registers: one read, one write
                          # (a quarter as many for float64)
LOOP_ELEMS = 4096         # tile of the looped sweeps over groups that do not fit
PROGRAMS_PER_SM = 4       # persistent grid of prox_kernel
SPLIT_BELOW_BLOCKS = 2    # a bucket with fewer blocks than this many per SM takes the split path
SPLIT_ELEMS = 4096        # split path: elements per program (outer rows x BLOCK_G x BLOCK_I)
SOFT_BLOCK = 2048         # soft_threshold_kernel: elements per program
# Elements per thread a tile may hold in registers without spilling (checked for every
# specialization by bench/compile_gate.py): with 16-byte accesses and 32-bit sums; halved for
# element-wise accesses (a 64-bit address per element) and for 64-bit offsets, a quarter for
# float64 (values, sums and per-group state take two registers each).
# The looped sweeps' sub-tiles hold three accumulators per element: they get half the tile cap.
ELEMS_PER_THREAD = 32
MAX_WARPS = {False: 16, True: 8}  # float64: 16 warps leave 128 registers a thread, too few
OFF32_LIMIT = 2 ** 31     # per-element offsets are int32 below this many elements per tensor
WIDE_ROWS_PER_TILE = 4  # float64 rows per tile: every thread holds the per-group state of its rows


def p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def capturing() -> bool:
    return not INTERPRET and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def address(t: torch.Tensor) -> int:
    """The address of a tensor's first element (for a meta tensor, as if its storage were
    16-byte aligned, as allocations are)."""
    if t.device.type == "meta":
        return t.storage_offset() * t.element_size()
    return t.data_ptr()


# ---------------------------------------------------------------------------------------------
# Register budgets and tile shapes.

def elems_per_thread(wide: bool, vec: int, off64: bool) -> int:
    per = ELEMS_PER_THREAD // (1 if vec > 1 else 2)
    return per // (4 if wide else 1) // (2 if off64 else 1)


def tile_cap(wide: bool, vec: int, off64: bool, warps: int = 16) -> int:
    """The most elements one program of at most ``warps`` warps may hold in registers."""
    return min(ONE_TILE_ELEMS,
               elems_per_thread(wide, vec, off64) * 32 * min(warps, MAX_WARPS[wide]))


def tile_shape(layout: GroupLayout, cap: int, cap_tall: int | None = None,
               wide: bool = False) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_G, BLOCK_I) for a layout, at most ``cap`` elements (``cap_tall`` for
    tiles of several outer rows, whose buckets often mix groups that fit with groups that do not:
    both paths in one kernel, which runs with 8 warps at most). Row-like groups (long contiguous
    runs) get the run in the tile's last axis and several short rows per program; column-like
    groups (short runs: columns, conv input channels) get neighbouring groups side by side, so
    that a tile row is a contiguous stretch of memory, and many outer rows per tile.
    BLOCK_I == 1 only when inner == 1 (the kernels rely on it)."""
    outer, groups, inner = layout.outer, layout.groups, layout.inner
    if outer > 1:
        cap = cap_tall or cap
    if inner >= 64 or outer == 1:
        bi = min(p2(inner), cap)
        bg = max(1, min(p2(groups), min(TILE_ELEMS, cap) // bi))
        bg = min(bg, WIDE_ROWS_PER_TILE) if wide else bg
        bo = 1 if outer == 1 else max(1, cap // (bg * bi))
    else:
        bi = p2(inner)
        bg = max(1, min(p2(groups), 64 // bi))
        bo = max(1, cap // (bg * bi))
    return bo, bg, bi


def choose_tile(layout: GroupLayout, base: torch.Tensor, arrays: int = 1,
                aligned: bool = True) -> tuple[tuple[int, int, int], int]:
    """(tile, VEC) of a weight whose bucket starts at ``base``: the largest tile its accesses
    allow (16-byte ones if it is aligned, element-wise ones otherwise), for a kernel that holds
    ``arrays`` values per element in registers. ``aligned=False``: element-wise accesses."""
    wide = layout.work.dtype == torch.float64
    off64 = is_off64(layout)

    def shape(vec):
        return tile_shape(layout, tile_cap(wide, vec, off64) // arrays,
                          tile_cap(wide, vec, off64, 8) // arrays, wide)

    vec = 16 // layout.work.element_size()
    tile = shape(vec)
    vec = vector_width(layout, tile, base) if aligned else 1
    if vec == 1:
        tile = shape(1)
    return tile, vec


def is_off64(layout: GroupLayout) -> bool:
    return layout.outer * layout.groups * layout.inner >= OFF32_LIMIT


def loop_tile(tile, cap: int) -> tuple[int, int]:
    """(LOOP_O, LOOP_I): the sub-tile of the looped sweeps, at most LOOP_ELEMS elements and half
    the tile cap (its accumulators)."""
    bo, bg, bi = tile
    elems = min(LOOP_ELEMS, cap // 2)
    li = min(bi, max(1, elems // bg))
    lo = min(bo, max(1, elems // (bg * li)))
    return lo, li


def split_rows(tile, cap: int) -> int:
    """Outer rows per program of the split path: at most SPLIT_ELEMS elements and the cap of a
    program of 8 warps."""
    return max(1, min(SPLIT_ELEMS, cap) // (tile[1] * tile[2]))


def fits(layout: GroupLayout, tile) -> bool:
    return layout.outer <= tile[0] and layout.inner <= tile[2]


def takes_split(layouts: list[GroupLayout], tile, flags, any_exact: bool, sms: int) -> bool:
    """Whether a bucket takes the split path: some group does not fit the tile, the bucket has
    too few blocks to fill the GPU, every inner run fits (the split cuts the outer dimension
    only), and the step needs per-group sums (a lone soft threshold needs one sweep, never two)
    other than the exact exclusive threshold (whose Newton steps need the whole group)."""
    bo, bg, bi = tile
    blocks = sum(lay.batch * triton.cdiv(lay.groups, bg) for lay in layouts)
    return ((flags[1] or flags[2]) and not any_exact
            and not all(fits(lay, tile) for lay in layouts)
            and all(lay.inner <= bi for lay in layouts)
            and blocks < SPLIT_BELOW_BLOCKS * sms)


def vector_width(layout: GroupLayout, tile, base: torch.Tensor) -> int:
    """Elements per 16-byte access the kernels may assume for this weight: 16 // itemsize when
    the bucket's base is 16-byte aligned, the weight starts a whole number of 16-byte words
    after it, and the tile's contiguous run (inner, or groups when inner == 1) is a multiple of
    16 bytes; else 1 (element-wise accesses, still correct)."""
    size = base.element_size()
    vec = 16 // size
    run, extent = (layout.groups, tile[1]) if tile[2] == 1 else (layout.inner, tile[2])
    ok = (address(base) % 16 == 0 and (address(layout.work) - address(base)) % 16 == 0
          and run % vec == 0 and extent >= vec)
    return vec if ok else 1


def acc_type(dtype):
    """The kernels' accumulation type (ACC) for weights of ``dtype``."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# Launch configurations.

def warp_configs(paths, wide: bool, vec: int = 1, max_warps: int = 16) -> list[dict]:
    """The warp counts a kernel may run with. ``paths``: (elements in registers, elements per
    thread allowed) of each code path compiled in. The two smallest counts that keep every path
    within its allowance, preferring those that give each thread at least ``vec`` elements (one
    16-byte access)."""
    if INTERPRET:
        return [dict(num_warps=4)]
    counts = [w for w in (1, 2, 4, 8, 16) if w <= min(MAX_WARPS[wide], max_warps)]
    fit = [w for w in counts if all(e <= per * 32 * w for e, per in paths)] or counts[-1:]
    if fit[0] <= 8:  # 16 warps (128 registers a thread) only for tiles that need them
        fit = [w for w in fit if w <= 8]
    # no more warps than the tile has elements for (idle threads), beyond the fewest that fit
    fit = [w for w in fit if w == fit[0] or all(e >= 32 * w for e, _ in paths)]
    wide_enough = [w for w in fit if all(e >= vec * 32 * w for e, _ in paths)]
    return [dict(num_warps=w, maxnreg=max_registers(w, wide)) for w in (wide_enough or fit)[:2]]


def max_registers(warps: int, wide: bool = False) -> int:
    """Registers a thread may use, given to ptxas (.maxnreg): all that one program per SM may
    have (255 up to 8 warps, 128 at 16). Left without it, ptxas trades a few spilled values for
    occupancy (seen: 80 registers and 48 bytes of spills where 89 registers spill nothing)."""
    return min(255, 65536 // (32 * warps))


# ---------------------------------------------------------------------------------------------
# Tuning: a small set of launch configurations per kernel, timed once per key (group size and
# group count, rounded to powers of two) on scratch copies: the kernels work in place.

_tuned: dict = {}


def choose_config(key, configs, trial):
    if len(configs) == 1:
        return configs[0]
    if key in _tuned:
        return _tuned[key]
    if capturing():  # no timing inside a capture: the first candidate
        return configs[0]
    times = [triton.testing.do_bench(lambda c=c: trial(c), warmup=5, rep=25) for c in configs]
    _tuned[key] = configs[times.index(min(times))]
    return _tuned[key]
