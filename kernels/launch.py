"""The host side of the CUDA kernels: thresholds, buckets, tables, tile shapes,
tuning and launches. The kernels themselves are in kernels/group_engine.py.

Every in-place operator, one weight or a list, goes through ``prox_``: weights are bucketed by
dtype, tile shape and alignment, and each bucket is one launch of ``prox_kernel`` (two for the
split path), whatever the number of weights in it. Nothing here synchronises with the GPU except the check
of thresholds given as CUDA tensors outside CUDA graph capture, and the tables a launch needs
are uploaded once and reused: a step captured in a CUDA graph after one eager call of the same
step uploads nothing and reads nothing back.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import torch
import triton

from . import group_engine as engine
from .layout import GroupLayout, analyze, finish, is_dense, to_kept_shape

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


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Arguments. The weights reach the entries checked (types, dims, devices, writable, no shared
# memory: fastprox/_triton.py, the op's registered CUDA kernel, checks them before it calls an
# entry, as the CPU kernels do in csrc/cpu/group_layout.cpp); the entries check their own tables.

def split_dims(weights, dims, dim_counts) -> list[list[int]]:
    """Each weight's reduced dimensions (its ``dim_counts[i]`` entries of the flat ``dims``),
    sorted and non-negative."""
    out, offset = [], 0
    for w, count in zip(weights, dim_counts):
        out.append(sorted({int(d) % w.dim() for d in dims[offset:offset + count]}))
        offset += count
    return out


def address_range(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of a tensor's elements."""
    begin = t.data_ptr()
    if t.numel() == 0:
        return begin, begin
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return begin, begin + (span + 1) * t.element_size()


def capturing() -> bool:
    return not INTERPRET and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# Thresholds: per weight (lam_l1, lam_group, lam_exclusive). Values the host can read (numbers,
# CPU tensors) are checked here and passed as a table; CUDA tensors stay on the GPU (a learning
# rate held in a CUDA tensor keeps working in a replayed CUDA graph).

def host_value(value):
    """The float of a number or CPU tensor; None for a tensor on the GPU."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return None
        return float(value.reshape(()).item())
    return float(value)


def check_value(v: float, name: str) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


def check_device_lams(table: torch.Tensor, names) -> None:
    """Checks thresholds held on the GPU (one synchronisation). Skipped during graph capture,
    where the kernels leave a weight untouched if its thresholds are not finite and >= 0."""
    if capturing():
        return
    bad = ~(torch.isfinite(table) & (table >= 0))
    if bool(bad.any()):
        i, k = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{names(i, k)} must be a finite number >= 0, got "
                         f"{float(table[i, k])}")


def lam_table(rows, device: torch.device, names) -> tuple[torch.Tensor, list[tuple]]:
    """rows: per weight, three thresholds (numbers or tensors). Returns the float64 (T, 3) table
    on ``device`` and, per weight, which thresholds may be nonzero (a CUDA tensor may)."""
    values = [[host_value(v) for v in row] for row in rows]
    for i, row in enumerate(values):
        for k, v in enumerate(row):
            if v is not None:
                check_value(v, names(i, k))
    maybe = [tuple(v is None or v != 0 for v in row) for row in values]
    on_device = any(v is None for row in values for v in row)
    if not on_device and not capturing():
        table = torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
        return table, maybe
    # Built on the GPU: a capture may not upload from pageable memory.
    cells = []
    for row, vals in zip(rows, values):
        for value, v in zip(row, vals):
            if v is None:
                cells.append(value.reshape(()).to(device=device, dtype=torch.float64))
            else:
                cells.append(torch.full((), v, dtype=torch.float64, device=device))
    table = torch.stack(cells).view(len(rows), 3)
    if on_device:
        check_device_lams(table, names)
    return table, maybe


# ---------------------------------------------------------------------------------------------
# Tables uploaded once per distinct launch.

class _Uploads:
    """Host-built tables on the device, by launch key. CUDA graph capture cannot upload from
    pageable memory: a captured step finds the tables of its eager warm-up call here, and the
    tables a capture used are kept for as long as the process lives (the graph reads them)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.kept: dict = {}

    def get(self, key, device, build):
        if key in self.kept:
            return self.kept[key]
        if key in self.entries:
            self.entries.move_to_end(key)
            found = self.entries[key]
        else:
            if capturing():
                raise RuntimeError(
                    "fastprox: this proximal step is captured in a CUDA graph before it ran "
                    "eagerly with the same tensors; run it once outside the capture first (a "
                    "warm-up step), so that its tables are on the GPU and its kernels compiled")
            found = tuple(t.to(device) for t in build())
            self.entries[key] = found
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        if capturing():
            self.kept[key] = found
        return found


uploads = _Uploads()


# ---------------------------------------------------------------------------------------------
# Tile shapes and buckets.

def elems_per_thread(wide: bool, vec: int, off64: bool) -> int:
    per = ELEMS_PER_THREAD // (1 if vec > 1 else 2)
    return per // (4 if wide else 1) // (2 if off64 else 1)


def tile_cap(wide: bool, vec: int, off64: bool, warps: int = 16) -> int:
    """The most elements one program of at most ``warps`` warps may hold in registers."""
    return min(ONE_TILE_ELEMS,
               elems_per_thread(wide, vec, off64) * 32 * min(warps, MAX_WARPS[wide]))


WIDE_ROWS_PER_TILE = 4  # float64 rows per tile: every thread holds the per-group state of its rows


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
        bi = min(_p2(inner), cap)
        bg = max(1, min(_p2(groups), min(TILE_ELEMS, cap) // bi))
        bg = min(bg, WIDE_ROWS_PER_TILE) if wide else bg
        bo = 1 if outer == 1 else max(1, cap // (bg * bi))
    else:
        bi = _p2(inner)
        bg = max(1, min(_p2(groups), 64 // bi))
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


class Item:
    """One weight of a launch: its layout, thresholds row and flags (and, for the metric step,
    its second moment laid out like the layout's working tensor)."""

    __slots__ = ("weight", "layout", "row", "size_weighted", "exact", "maybe", "moment")

    def __init__(self, weight, layout, row, size_weighted, exact, maybe, moment=None):
        self.weight, self.layout, self.row = weight, layout, row
        self.size_weighted, self.exact, self.maybe = size_weighted, exact, maybe
        self.moment = moment


def _tables(items: list[Item], tile, split_rows: int):
    """(key, build) of a bucket's tables: int64 meta (T, META_COLS) and int32 blocks
    (2, num_blocks) = (tensor index, block within the tensor)."""
    bo, bg, bi = tile
    base = items[0].layout.work
    size = base.element_size()
    key = [tile, split_rows, base.dtype]
    for it in items:
        lay = it.layout
        key.append((address(lay.work), lay.batch, lay.outer, lay.groups, lay.inner,
                    it.size_weighted, it.exact, it.row))

    def build():
        meta = torch.zeros(len(items), engine.META_COLS.value, dtype=torch.int64)
        ts, locals_ = [], []
        out = 0
        for t, it in enumerate(items):
            lay = it.layout
            per_batch = triton.cdiv(lay.groups, bg)
            chunks = triton.cdiv(lay.outer, split_rows) if split_rows else 1
            meta[t, engine.META_OFFSET.value] = (address(lay.work) - address(base)) // size
            meta[t, engine.META_OUTER.value] = lay.outer
            meta[t, engine.META_GROUPS.value] = lay.groups
            meta[t, engine.META_INNER.value] = lay.inner
            meta[t, engine.META_BLOCKS.value] = per_batch
            meta[t, engine.META_OUT.value] = out
            c = math.sqrt(lay.group_size) if it.size_weighted else 1.0
            meta[t, engine.META_C.value] = torch.tensor(c, dtype=torch.float64).view(torch.int64)
            meta[t, engine.META_EXACT.value] = int(it.exact)
            meta[t, engine.META_CHUNKS.value] = chunks
            meta[t, engine.META_LAM.value] = it.row
            count = lay.batch * per_batch
            ts.append(torch.full((count,), t, dtype=torch.int32))
            locals_.append(torch.arange(count, dtype=torch.int32))
            out += lay.num_groups
        blocks = torch.stack([torch.cat(ts), torch.cat(locals_)])
        return meta, blocks

    return tuple(key), build


def _bucket_key(it: Item):
    lay = it.layout
    tile, vec = choose_tile(lay, lay.work)
    return (lay.work.dtype, tile, vec > 1, is_off64(lay))


def _acc(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# Launch plans: what the GPU runs, computed on the host from layouts alone. The same plans are
# compiled ahead of time, without a GPU, by bench/compile_gate.py (on meta tensors).

@dataclasses.dataclass
class Launch:
    kernel: str              # a @triton.jit function of kernels/group_engine.py
    grid: tuple
    args: tuple              # run-time arguments, in order (tensors and ints)
    constexprs: dict
    configs: list            # launch configurations ({"num_warps": w}); timed when several

    def run(self, config):
        getattr(engine, self.kernel)[self.grid](*self.args, **self.constexprs, **config)


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


class Tables:
    """Where a plan's tables come from: uploaded once per distinct launch (a GPU run) or built
    on the CPU (a plan compiled without a GPU)."""

    def __init__(self, device, upload: bool):
        self.device, self.upload = device, upload

    def get(self, key, build):
        if self.upload:
            return uploads.get(key, self.device, build)
        return build()

    def empty(self, n, dtype):
        return torch.empty(n, dtype=dtype, device=self.device if self.upload else "cpu")

    def zeros(self, n, dtype):
        return torch.zeros(n, dtype=dtype, device=self.device if self.upload else "cpu")


def _persistent(items: list[Item], tile, sms: int, tables: Tables):
    """(meta, blocks, number of blocks, grid) of a persistent launch over a bucket's blocks."""
    key, build = _tables(items, tile, 0)
    meta, blocks = tables.get(key, build)
    num_blocks = blocks.shape[1]
    grid = max(1, min(num_blocks, PROGRAMS_PER_SM * sms))
    if INTERPRET:
        grid = min(num_blocks, 3)  # a few programs: the persistent loop is exercised
    return meta, blocks, num_blocks, grid


def plan_bucket(items: list[Item], lams: torch.Tensor, flags, sms: int, tables: Tables,
                norms=None) -> tuple[list[Launch], tuple]:
    """The launches of one bucket (weights of one dtype, tile and alignment) and its tuning key."""
    do_l1, do_group, do_excl = flags
    work = items[0].layout.work
    tile, _ = choose_tile(items[0].layout, work)
    bo, bg, bi = tile
    layouts = [it.layout for it in items]
    any_exact = do_excl and any(it.exact for it in items)
    split = norms is None and takes_split(layouts, tile, flags, any_exact, sms)
    wide = work.dtype == torch.float64
    vec = min(vector_width(lay, tile, work) for lay in layouts)
    off64 = any(is_off64(lay) for lay in layouts)
    per = elems_per_thread(wide, vec, off64)
    common = dict(VEC=vec, OFF64=off64, DO_L1=do_l1, DO_EXCL=do_excl, WIDE=wide,
                  ACC=_acc(work.dtype))
    n_key = _p2(max(lay.group_size for lay in layouts)).bit_length()
    g_key = _p2(sum(lay.num_groups for lay in layouts)).bit_length()
    tune_key = ("split" if split else "fused", work.dtype, tile, flags, norms is not None,
                n_key, g_key, vec, str(work.device))
    if split:
        rows = split_rows(tile, tile_cap(wide, vec, off64, 8)) if not INTERPRET else 4
        key, build = _tables(items, (rows, bg, bi), rows)
        meta, blocks = tables.get(key, build)
        num_blocks = blocks.shape[1]
        chunks = max(triton.cdiv(lay.outer, rows) for lay in layouts)
        partial = tables.empty(num_blocks * chunks * 3 * bg,
                               torch.float64 if wide else torch.float32)
        configs = warp_configs([(rows * bg * bi, per)], wide, vec)
        shape = dict(BLOCK_O=rows, BLOCK_G=bg, BLOCK_I=bi)
        args = (work, meta, lams, blocks, partial, num_blocks, chunks)
        return [Launch("split_stats_kernel", (num_blocks, chunks), args, dict(**shape, **common),
                       configs),
                Launch("split_apply_kernel", (num_blocks, chunks), args,
                       dict(**shape, **common, CHUNKS_P2=min(_p2(chunks), 64),
                            DO_GROUP=do_group), configs)], tune_key
    meta, blocks, num_blocks, grid = _persistent(items, tile, sms, tables)
    fit = [fits(lay, tile) for lay in layouts]
    fit_mode = 1 if all(fit) else 2 if not any(fit) else 3
    lo, li = loop_tile(tile, tile_cap(wide, vec, off64))
    paths = ([(bo * bg * bi, per)] if fit_mode != 2 else []) + \
        ([(lo * bg * li, per // 2)] if fit_mode != 1 else [])
    args = (work, meta, lams, blocks, work if norms is None else norms, num_blocks,
            triton.cdiv(num_blocks, grid))
    constexprs = dict(BLOCK_O=bo, BLOCK_G=bg, BLOCK_I=bi, LOOP_O=lo, LOOP_I=li, FIT=fit_mode,
                      DO_GROUP=do_group, NORMS_ONLY=norms is not None, **common)
    # The looped sweeps keep per-group state beside their accumulators: at 16 warps (128
    # registers a thread) they spill, so a kernel that holds them runs with 8 at most.
    configs = warp_configs(paths, wide, vec, 8 if fit_mode != 1 else MAX_WARPS[wide])
    return [Launch("prox_kernel", (grid,), args, constexprs, configs)], \
        tune_key + (fit_mode,)


def plan_prox(entries, table: torch.Tensor, maybe, sms: int, tables: Tables):
    """The launches of one proximal step (``prox_``'s arguments, checked): per bucket, its items,
    flags (which thresholds may be nonzero), launches and tuning key."""
    buckets: dict = {}
    for row, (weight, dims, _, size_weighted, exact) in enumerate(entries):
        if weight.numel() == 0 or not any(maybe[row]):
            continue  # bit-identical: nothing to do
        layout = analyze(weight, dims)
        it = Item(weight, layout, row, size_weighted, exact, maybe[row])
        if layout.num_groups == 0 or layout.group_size == 0:
            continue
        buckets.setdefault(_bucket_key(it), []).append(it)
    plans = []
    for items in buckets.values():
        for same in _by_offset(items):
            flags = tuple(any(it.maybe[k] for it in same) for k in range(3))
            plans.append((same, flags, *plan_bucket(same, table, flags, sms, tables)))
    return plans


def plan_group_norms(weight, layout, sms: int, tables: Tables, norms):
    zero = tables.zeros(3, torch.float64).view(1, 3)  # valid thresholds
    it = Item(weight, layout, 0, False, False, (False, False, False))
    return plan_bucket([it], zero, (False, False, False), sms, tables, norms=norms)[0]


def plan_soft_threshold(work: torch.Tensor, table: torch.Tensor) -> Launch:
    wide = work.dtype == torch.float64
    vec = 16 // work.element_size()
    vec = vec if address(work) % 16 == 0 and work.numel() % vec == 0 else 1
    return Launch("soft_threshold_kernel", (triton.cdiv(work.numel(), SOFT_BLOCK),),
                  (work, work.numel() // vec, table),
                  dict(BLOCK=SOFT_BLOCK, VEC=vec, WIDE=wide, ACC=_acc(work.dtype)),
                  warp_configs([(SOFT_BLOCK, elems_per_thread(wide, vec, False))], wide,
                               vec)[:1])


# ---------------------------------------------------------------------------------------------
# Tuning: a small set of launch configurations per kernel, timed once per key (group size and
# group count, rounded to powers of two) on scratch copies: the kernels work in place.

_tuned: dict = {}


def _choose(key, configs, trial):
    if len(configs) == 1:
        return configs[0]
    if key in _tuned:
        return _tuned[key]
    if capturing():  # no timing inside a capture: the first candidate
        return configs[0]
    times = [triton.testing.do_bench(lambda c=c: trial(c), warmup=5, rep=25) for c in configs]
    _tuned[key] = configs[times.index(min(times))]
    return _tuned[key]


def _scratch(items: list[Item]) -> list[Item]:
    """Copies of a bucket's working tensors with the same strides, for timing trials."""
    out = []
    for it in items:
        work = it.layout.work
        copy = torch.empty_strided(work.shape, work.stride(), dtype=work.dtype,
                                   device=work.device).copy_(work)
        lay = GroupLayout(copy, it.layout.batch, it.layout.outer, it.layout.groups,
                          it.layout.inner)
        out.append(Item(copy, lay, it.row, it.size_weighted, it.exact, it.maybe, it.moment))
    return out


# ---------------------------------------------------------------------------------------------
# Launches.

def _run_bucket(items, launches: list[Launch], tune_key, replan) -> None:
    """Runs a bucket's launches with the configuration tuned for its key; replan(items) gives
    the launches of the same bucket for other tensors (the scratch copies of a trial)."""
    configs = launches[0].configs
    if len(configs) == 1:
        config = configs[0]
    else:
        def trial(c):
            for launch in replan(_scratch(items)):
                launch.run(c)
        config = _choose(tune_key, configs, trial)
    for launch in launches:
        launch.run(config)


def prox_(entries, names, table: torch.Tensor | None = None,
          used=(True, True, True)) -> None:
    """One proximal step per weight. entries: (weight, dims, (l1, lg, le), size_weighted,
    exact) with checked weight and dims; names(i, k) names threshold k of weight i. ``table``:
    the thresholds as a checked float64 (T, 3) tensor on the weights' device (the rows of
    entries are then not read). ``used[k]``: whether the caller may set threshold k at all."""
    if not entries:
        return
    device = entries[0][0].device
    if table is None:
        table, maybe = lam_table([e[2] for e in entries], device, names)
    else:
        maybe = [(True, True, True)] * len(entries)
    maybe = [tuple(m and u for m, u in zip(row, used)) for row in maybe]
    if len(entries) == 1 and maybe[0][1:] == (False, False):
        if maybe[0][0]:  # the soft threshold alone: elementwise over the memory span
            _soft_threshold(entries[0][0], table)
        return
    sms = sm_count(device)
    tables = Tables(device, upload=True)
    plans = plan_prox(entries, table, maybe, sms, tables)
    for items, flags, launches, tune_key in plans:
        _run_bucket(items, launches, tune_key,
                    lambda its, f=flags: plan_bucket(its, table, f, sms, tables)[0])
    for items, _, _, _ in plans:
        for it in items:
            finish(it.weight, it.layout)


def _by_offset(items: list[Item]) -> list[list[Item]]:
    """A bucket's weights by launch: those whose address is not a whole number of elements away
    from the first one's (possible only for unusual storage offsets) get launches of their
    own."""
    size = items[0].layout.work.element_size()
    base = address(items[0].layout.work)
    same = [it for it in items if (address(it.layout.work) - base) % size == 0]
    rest = [it for it in items if (address(it.layout.work) - base) % size != 0]
    return [same] + (_by_offset(rest) if rest else [])


def group_norms(weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    kept_shape = [s for d, s in enumerate(weight.shape) if d not in dims]
    if weight.numel() == 0:
        return torch.zeros(kept_shape, dtype=weight.dtype, device=weight.device)
    layout = analyze(weight, dims)
    norms = torch.empty(layout.num_groups, dtype=weight.dtype, device=weight.device)
    if layout.num_groups:
        for launch in plan_group_norms(weight, layout, sm_count(weight.device),
                                       Tables(weight.device, upload=True), norms):
            launch.run(launch.configs[0])
    return to_kept_shape(norms, weight, dims, layout)


def _soft_threshold(weight: torch.Tensor, table: torch.Tensor) -> None:
    """Elementwise over the memory span of a dense weight (a working copy otherwise); the
    threshold is table[0, 0]."""
    if weight.numel() == 0:
        return
    work = weight if is_dense(weight) else weight.contiguous()
    launch = plan_soft_threshold(work, table)
    launch.run(launch.configs[0])
    if work is not weight:
        weight.copy_(work)


# ---------------------------------------------------------------------------------------------
# The phases of steps whose groups lie in several places (kernels/group_phases.py): the same
# buckets and tables as the step, one launch of phase_kernel per bucket.

PHASE_SUMS, PHASE_ABOVE, PHASE_REWRITE = (engine.PHASE_SUMS.value, engine.PHASE_ABOVE.value,
                                          engine.PHASE_REWRITE.value)
PHASE_ROWS = {PHASE_SUMS: 3, PHASE_ABOVE: 2, PHASE_REWRITE: 0}  # per-group output rows


class PhaseBucket:
    """A bucket of a phase call: its items, and where each item's groups start in its rows."""

    def __init__(self, items: list[Item]):
        self.items = items
        self.starts = []
        total = 0
        for it in items:
            self.starts.append(total)
            total += it.layout.num_groups
        self.total = total
        self.acc = torch.float64 if items[0].layout.work.dtype == torch.float64 \
            else torch.float32


def phase_layouts(entries, needed=None) -> list:
    """The layout of each (weight, dims) of a call (checked), None for a weight with no group
    or no element (its sums are 0, its rewrite changes nothing) or not ``needed`` (analyzed
    only where needed: a layout may copy the weight)."""
    out = []
    for k, (weight, dims) in enumerate(entries):
        wanted = weight.numel() and (needed is None or needed[k])
        layout = analyze(weight, dims) if wanted else None
        out.append(layout if layout is not None and layout.num_groups and layout.group_size
                   else None)
    return out


def phase_buckets(weights, layouts) -> list[PhaseBucket]:
    """The buckets of a call's weights (phase_layouts); Item.row is the weight's index."""
    buckets: dict = {}
    for row, (weight, layout) in enumerate(zip(weights, layouts)):
        if layout is None:
            continue
        it = Item(weight, layout, row, False, False, None)
        buckets.setdefault(_bucket_key(it), []).append(it)
    return [PhaseBucket(same) for items in buckets.values() for same in _by_offset(items)]


def plan_phase(bucket: PhaseBucket, l1s: torch.Tensor, phase: int, params: torch.Tensor,
               out: torch.Tensor, sms: int, tables: Tables) -> Launch:
    """The launch of one phase over a bucket: ``l1s`` (float64, one per entry of the call),
    ``params`` (2, total) per-group scale and tau, ``out`` (rows, total) the sums (either may be
    a placeholder where the phase does not read or write it). One launch configuration: the
    sums' order does not depend on a timing."""
    items = bucket.items
    work = items[0].layout.work
    tile, _ = choose_tile(items[0].layout, work)
    bo, bg, bi = tile
    wide = work.dtype == torch.float64
    vec = min(vector_width(it.layout, tile, work) for it in items)
    off64 = any(is_off64(it.layout) for it in items)
    lo, li = loop_tile(tile, tile_cap(wide, vec, off64))
    # a sub-tile's contiguous run shorter than 16 bytes, or too few elements for 16 bytes a
    # thread of one warp: element-wise accesses
    if (li if bi > 1 else bg) < vec or lo * bg * li < 32 * vec:
        vec = 1
        lo, li = loop_tile(tile, tile_cap(wide, vec, off64))
    meta, blocks, num_blocks, grid = _persistent(items, tile, sms, tables)
    per = elems_per_thread(wide, vec, off64)
    configs = warp_configs([(lo * bg * li, per // 2)], wide, vec, 8)[:1]
    args = (work, meta, l1s, blocks, params, out, num_blocks, triton.cdiv(num_blocks, grid),
            bucket.total)
    constexprs = dict(LOOP_O=lo, BLOCK_G=bg, LOOP_I=li, BLOCK_I=bi, VEC=vec, OFF64=off64,
                      PHASE=phase, WIDE=wide, ACC=_acc(work.dtype))
    return Launch("phase_kernel", (grid,), args, constexprs, configs)


def phase_(weights, layouts, l1s: list[float], phase: int, values=None) -> list:
    """One phase over a call's weights (checked) with their layouts (phase_layouts); l1s:
    checked floats; values (rewrite, sums above): per weight (scale or None, tau or None),
    per-group values in the weight's group order (to_group_order), on the weights' device.
    Returns per weight its (PHASE_ROWS[phase], groups) sums in group order (None for a weight
    without a layout), and writes the rewrite back into weights that went through a working
    copy."""
    results: list = [None] * len(weights)
    if not weights:
        return results
    device = weights[0].device
    sms = sm_count(device)
    tables = Tables(device, upload=True)
    l1_table = uploads.get(("l1s", tuple(l1s)), device,
                           lambda: (torch.tensor(l1s, dtype=torch.float64),))[0]
    rows = PHASE_ROWS[phase]
    buckets = phase_buckets(weights, layouts)
    for bucket in buckets:
        out = torch.empty(max(rows, 1), bucket.total, dtype=bucket.acc, device=device)
        params = out
        if values is not None:
            scales, taus = [], []
            for it in bucket.items:
                scale, tau = values[it.row]
                n = it.layout.num_groups
                scales.append(scale.to(bucket.acc) if scale is not None else
                              torch.ones(n, dtype=bucket.acc, device=device))
                taus.append(tau.to(bucket.acc) if tau is not None else
                            torch.zeros(n, dtype=bucket.acc, device=device))
            params = torch.stack([torch.cat(scales), torch.cat(taus)])
        lau = plan_phase(bucket, l1_table, phase, params, out, sms, tables)
        lau.run(lau.configs[0])
        for it, start in zip(bucket.items, bucket.starts):
            if rows:
                results[it.row] = out[:rows, start:start + it.layout.num_groups]
            else:
                finish(it.weight, it.layout)
    return results


def to_group_order(values: torch.Tensor, weight: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Per-group values shaped like the kept dimensions (logical order) -> a flat tensor in the
    layout's group order (the inverse of to_kept_shape)."""
    order = list(layout.kept_in_group_order)
    if order == sorted(order):
        return values.reshape(-1)
    logical = sorted(order)
    view = values.reshape([weight.size(d) for d in logical])
    return view.permute([logical.index(d) for d in order]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Proximal steps in an optimizer's metric (kernels/metric_prox.py): each weight with its second
# moment, laid out alike; buckets as for the step, one launch of metric_kernel per bucket.

METRIC_ARRAYS = 2  # the fused path holds the weight and d in registers: half the tile


def moment_like(moment: torch.Tensor, weight: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """The second moment with the element order of ``layout.work``: itself when its strides are
    the weight's (and the weight is its own working tensor), else a copy laid out so."""
    if not layout.is_copy:
        same = all(a == b for a, b, n in zip(moment.stride(), weight.stride(), weight.shape)
                   if n > 1)
        if same:
            return moment
        return torch.empty_strided(weight.shape, weight.stride(), dtype=moment.dtype,
                                   device=moment.device).copy_(moment)
    source = moment.permute(layout.copy_perm) if layout.copy_perm else moment
    return source.contiguous()


def _moment_aligned(it: Item, base: torch.Tensor | None = None) -> bool:
    """16-byte accesses of the moment: the weight's dtype, 16-byte aligned (from ``base``)."""
    m = it.moment
    ok = m.dtype == it.layout.work.dtype and address(m) % 16 == 0
    return ok if base is None else ok and (address(m) - address(base)) % 16 == 0


def _metric_key(it: Item):
    lay = it.layout
    aligned = _moment_aligned(it)
    tile, vec = choose_tile(lay, lay.work, METRIC_ARRAYS, aligned)
    return (lay.work.dtype, it.moment.dtype, tile, vec > 1, is_off64(lay))


def plan_metric(items: list[Item], lams: torch.Tensor, metric: torch.Tensor, flags, sms: int,
                tables: Tables) -> tuple[list[Launch], tuple]:
    """The launch of one bucket of the metric step and its tuning key. ``lams`` and ``metric``:
    the (T, 3) float64 tables of thresholds and of (s, eps, 1/lr) on the weights' device."""
    work, mom = items[0].layout.work, items[0].moment
    aligned = all(_moment_aligned(it, mom) for it in items)
    tile, _ = choose_tile(items[0].layout, work, METRIC_ARRAYS, aligned)
    bo, bg, bi = tile
    layouts = [it.layout for it in items]
    wide = work.dtype == torch.float64
    vec = min(vector_width(lay, tile, work) for lay in layouts) if aligned else 1
    off64 = any(is_off64(lay) for lay in layouts)
    per = elems_per_thread(wide, vec, off64)
    meta, blocks, num_blocks, grid = _persistent(items, tile, sms, tables)
    size = mom.element_size()
    offsets = tables.get(("moments", mom.dtype, tuple(address(it.moment) for it in items)),
                         lambda: (torch.tensor([(address(it.moment) - address(mom)) // size
                                                for it in items], dtype=torch.int64),))[0]
    fit = [fits(lay, tile) for lay in layouts]
    fit_mode = 1 if all(fit) else 2 if not any(fit) else 3
    # the looped sweeps hold four accumulators beside the loaded values: a quarter of the tile
    lo, li = loop_tile(tile, tile_cap(wide, vec, off64) // (2 * METRIC_ARRAYS))
    paths = ([(bo * bg * bi, per // METRIC_ARRAYS)] if fit_mode != 2 else []) + \
        ([(lo * bg * li, per // (2 * METRIC_ARRAYS))] if fit_mode != 1 else [])
    args = (work, mom, meta, lams, metric, offsets, blocks, num_blocks,
            triton.cdiv(num_blocks, grid))
    constexprs = dict(BLOCK_O=bo, BLOCK_G=bg, BLOCK_I=bi, LOOP_O=lo, LOOP_I=li, FIT=fit_mode,
                      VEC=vec, OFF64=off64, DO_L1=flags[0], DO_GROUP=flags[1],
                      DO_EXCL=flags[2], WIDE=wide, ACC=_acc(work.dtype))
    configs = warp_configs(paths, wide, vec, 8 if fit_mode != 1 else MAX_WARPS[wide])
    n_key = _p2(max(lay.group_size for lay in layouts)).bit_length()
    g_key = _p2(sum(lay.num_groups for lay in layouts)).bit_length()
    tune_key = ("metric", work.dtype, mom.dtype, tile, tuple(flags), n_key, g_key, vec,
                fit_mode, str(work.device))
    return [Launch("metric_kernel", (grid,), args, constexprs, configs)], tune_key


def _by_offsets(items: list[Item]) -> list[list[Item]]:
    """_by_offset for the weights and for their moments: a launch addresses both from its first
    item's."""
    out = []
    for same in _by_offset(items):
        size = same[0].moment.element_size()
        base = address(same[0].moment)
        ok = [it for it in same if (address(it.moment) - base) % size == 0]
        rest = [it for it in same if (address(it.moment) - base) % size != 0]
        out += [ok] + (_by_offsets(rest) if rest else [])
    return out


def plan_metric_step(entries, maybe, lams: torch.Tensor, metric: torch.Tensor, sms: int,
                     tables: Tables):
    """The launches of one metric step: entries (weight, moment, dims, size_weighted, exact),
    checked; maybe[i]: which thresholds of weight i may be nonzero. Per bucket: its items,
    flags, launches and tuning key."""
    buckets: dict = {}
    for row, (weight, moment, dims, size_weighted, exact) in enumerate(entries):
        if weight.numel() == 0 or not any(maybe[row]):
            continue  # bit-identical: nothing to do
        layout = analyze(weight, dims)
        if layout.num_groups == 0 or layout.group_size == 0:
            continue
        it = Item(weight, layout, row, size_weighted, exact, maybe[row],
                  moment_like(moment, weight, layout))
        buckets.setdefault(_metric_key(it), []).append(it)
    plans = []
    for items in buckets.values():
        for same in _by_offsets(items):
            flags = tuple(any(it.maybe[k] for it in same) for k in range(3))
            plans.append((same, flags, *plan_metric(same, lams, metric, flags, sms, tables)))
    return plans


def metric_(entries, lam_rows, metric_rows) -> None:
    """The metric step (entries as for plan_metric_step; lam_rows: per weight its three checked
    thresholds; metric_rows: its checked (s, eps, lr))."""
    if not entries:
        return
    device = entries[0][0].device
    table = torch.tensor(lam_rows, dtype=torch.float64).reshape(-1, 3).to(device)
    metric = torch.tensor([(s, eps, 1.0 / lr) for s, eps, lr in metric_rows],
                          dtype=torch.float64).reshape(-1, 3).to(device)
    maybe = [tuple(v != 0 for v in row) for row in lam_rows]
    sms = sm_count(device)
    tables = Tables(device, upload=True)
    plans = plan_metric_step(entries, maybe, table, metric, sms, tables)
    for items, flags, launches, tune_key in plans:
        _run_bucket(items, launches, tune_key,
                    lambda its, f=flags: plan_metric(its, table, metric, f, sms, tables)[0])
    for items, _, _, _ in plans:
        for it in items:
            finish(it.weight, it.layout)
