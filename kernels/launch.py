"""The host side of the CUDA kernels: argument checks, thresholds, buckets, tables, tile shapes,
tuning and launches. The kernels themselves are in kernels/group_engine.py.

Every in-place operator, one weight or a list, goes through ``prox_``: weights are bucketed by
dtype and tile shape, and each bucket is one launch of ``prox_kernel`` (two for the split path),
whatever the number of weights in it. Nothing here synchronises with the GPU except the check
of thresholds given as CUDA tensors outside CUDA graph capture, and the tables a launch needs
are uploaded once and reused: a step captured in a CUDA graph after one eager call of the same
step uploads nothing and reads nothing back.
"""

from __future__ import annotations

import collections
import math
import os

import torch
import triton

from . import group_engine as engine
from .layout import GroupLayout, analyze, finish, is_dense, to_kept_shape

# Set by triton too; read once here, as triton does at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

LAM_NAMES = ("lam_l1", "lam_group", "lam_exclusive")

TILE_ELEMS = 4096         # elements of a row-like tile (several rows per program when short)
ONE_TILE_ELEMS = 16384    # a group up to this size is kept in registers: one read, one write
PROGRAMS_PER_SM = 4       # persistent grid of prox_kernel
SPLIT_BELOW_BLOCKS = 2    # a bucket with fewer blocks than this many per SM takes the split path
SPLIT_CHUNK_ROWS = 64     # split path: outer rows per program (times BLOCK_G x BLOCK_I elements)


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Checks beyond fastprox/_checks.py (shared with the Python API), all before any memory is touched:
# the Python API checks first; these keep direct torch.ops calls on CUDA from reaching a kernel
# with bad arguments, as the CPU kernels' own checks do (csrc/cpu/group_layout.cpp).

def check_writable(weight: torch.Tensor, name: str = "weight") -> None:
    if torch._debug_has_internal_overlap(weight) == 1:
        raise ValueError(f"{name} has elements that share memory (e.g. an expanded tensor) and "
                         "cannot be updated in place")


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

def tile_shape(layout: GroupLayout) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_G, BLOCK_I) for a layout. Row-like groups (long contiguous runs) get the
    run in the tile's last axis and several short rows per program; column-like groups (short
    runs: columns, conv input channels) get neighbouring groups side by side, so that a tile row
    is a contiguous stretch of memory, and many outer rows per tile."""
    outer, groups, inner = layout.outer, layout.groups, layout.inner
    if inner >= 64 or outer == 1:
        bi = min(_p2(inner), ONE_TILE_ELEMS)
        bg = max(1, min(_p2(groups), TILE_ELEMS // bi))
        bo = 1 if outer == 1 else max(1, ONE_TILE_ELEMS // (bg * bi))
    else:
        bi = _p2(inner)
        bg = max(1, min(_p2(groups), 64 // bi))
        bo = max(1, ONE_TILE_ELEMS // (bg * bi))
    return bo, bg, bi


def takes_split(layouts: list[GroupLayout], tile, flags, any_exact: bool, sms: int) -> bool:
    """Whether a bucket takes the split path: some group does not fit the tile, the bucket has
    too few blocks to fill the GPU, every inner run fits (the split cuts the outer dimension
    only), and the step needs per-group sums (a lone soft threshold needs one sweep, never two)
    other than the exact exclusive threshold (whose Newton steps need the whole group)."""
    bo, bg, bi = tile
    blocks = sum(lay.batch * triton.cdiv(lay.groups, bg) for lay in layouts)
    return ((flags[1] or flags[2]) and not any_exact
            and not all(lay.outer <= bo and lay.inner <= bi for lay in layouts)
            and all(lay.inner <= bi for lay in layouts)
            and blocks < SPLIT_BELOW_BLOCKS * sms)


def sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class Item:
    """One weight of a launch: its layout, thresholds row and flags."""

    __slots__ = ("weight", "layout", "row", "size_weighted", "exact", "maybe")

    def __init__(self, weight, layout, row, size_weighted, exact, maybe):
        self.weight, self.layout, self.row = weight, layout, row
        self.size_weighted, self.exact, self.maybe = size_weighted, exact, maybe


def _tables(items: list[Item], tile, split_rows: int):
    """(key, build) of a bucket's tables: int64 meta (T, META_COLS) and int32 blocks
    (2, num_blocks) = (tensor index, block within the tensor)."""
    bo, bg, bi = tile
    base = items[0].layout.work
    size = base.element_size()
    key = [tile, split_rows, base.dtype]
    for it in items:
        lay = it.layout
        key.append((lay.work.data_ptr(), lay.batch, lay.outer, lay.groups, lay.inner,
                    it.size_weighted, it.exact, it.row))

    def build():
        meta = torch.zeros(len(items), engine.META_COLS, dtype=torch.int64)
        ts, locals_ = [], []
        out = 0
        for t, it in enumerate(items):
            lay = it.layout
            per_batch = triton.cdiv(lay.groups, bg)
            chunks = triton.cdiv(lay.outer, split_rows) if split_rows else 1
            meta[t, engine.META_OFFSET] = (lay.work.data_ptr() - base.data_ptr()) // size
            meta[t, engine.META_OUTER] = lay.outer
            meta[t, engine.META_GROUPS] = lay.groups
            meta[t, engine.META_INNER] = lay.inner
            meta[t, engine.META_BLOCKS] = per_batch
            meta[t, engine.META_OUT] = out
            meta[t, engine.META_SIZE_WEIGHTED] = int(it.size_weighted)
            meta[t, engine.META_EXACT] = int(it.exact)
            meta[t, engine.META_CHUNKS] = chunks
            meta[t, engine.META_LAM] = it.row
            count = lay.batch * per_batch
            ts.append(torch.full((count,), t, dtype=torch.int32))
            locals_.append(torch.arange(count, dtype=torch.int32))
            out += lay.num_groups
        blocks = torch.stack([torch.cat(ts), torch.cat(locals_)])
        return meta, blocks

    return tuple(key), build


def _bucket_key(it: Item):
    lay = it.layout
    return (lay.work.dtype, tile_shape(lay))


def _acc(dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# Tuning: a small set of launch configurations per kernel, timed once per key (group size and
# group count, rounded to powers of two) on scratch copies: the kernels work in place.

_tuned: dict = {}


def _configs(tile) -> list[dict]:
    elems = tile[0] * tile[1] * tile[2]
    if INTERPRET:
        return [dict(num_warps=4)]
    if elems >= 8192:
        return [dict(num_warps=8), dict(num_warps=16)]
    return [dict(num_warps=4), dict(num_warps=8)]


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
        out.append(Item(copy, lay, it.row, it.size_weighted, it.exact, it.maybe))
    return out


# ---------------------------------------------------------------------------------------------
# Launches.

def _launch_bucket(items: list[Item], lams: torch.Tensor, flags, norms=None) -> None:
    do_l1, do_group, do_excl = flags
    base = items[0].layout.work
    device = base.device
    tile = tile_shape(items[0].layout)
    bo, bg, bi = tile
    any_exact = do_excl and any(it.exact for it in items)
    split = norms is None and takes_split([it.layout for it in items], tile, flags, any_exact,
                                          sm_count(device))
    wide = base.dtype == torch.float64
    n_key = _p2(max(it.layout.group_size for it in items)).bit_length()
    g_key = _p2(sum(it.layout.num_groups for it in items)).bit_length()
    kind = "split" if split else "fused"
    tune_key = (kind, base.dtype, tile, flags, norms is not None, n_key, g_key, device)

    if split:
        rows = SPLIT_CHUNK_ROWS if not INTERPRET else 4
        tile = (rows, bg, bi)

        def run(its, config):
            key, build = _tables(its, tile, rows)
            meta, blocks = uploads.get(key, device, build)
            num_blocks = blocks.shape[1]
            chunks = max(triton.cdiv(it.layout.outer, rows) for it in its)
            partial = torch.empty(num_blocks * chunks * 3 * bg, device=device,
                                  dtype=torch.float64 if wide else torch.float32)
            work = its[0].layout.work
            common = dict(BLOCK_O=rows, BLOCK_G=bg, BLOCK_I=bi, DO_L1=do_l1, DO_EXCL=do_excl,
                          WIDE=wide, ACC=_acc(work.dtype), **config)
            engine.split_stats_kernel[(num_blocks, chunks)](
                work, meta, lams, blocks, partial, num_blocks, chunks, **common)
            engine.split_apply_kernel[(num_blocks, chunks)](
                work, meta, lams, blocks, partial, num_blocks, chunks,
                CHUNKS_P2=min(_p2(chunks), 64), DO_GROUP=do_group, **common)
    else:
        def run(its, config):
            key, build = _tables(its, tile, 0)
            meta, blocks = uploads.get(key, device, build)
            num_blocks = blocks.shape[1]
            grid = max(1, min(num_blocks, PROGRAMS_PER_SM * sm_count(device)))
            if INTERPRET:
                grid = min(num_blocks, 3)  # a few programs: the persistent loop is exercised
            work = its[0].layout.work
            engine.prox_kernel[(grid,)](
                work, meta, lams, blocks, work if norms is None else norms, num_blocks,
                triton.cdiv(num_blocks, grid),
                BLOCK_O=bo, BLOCK_G=bg, BLOCK_I=bi, DO_L1=do_l1, DO_GROUP=do_group,
                DO_EXCL=do_excl, NORMS_ONLY=norms is not None, WIDE=wide,
                ACC=_acc(work.dtype), **config)

    configs = _configs(tile)
    if norms is not None or len(configs) == 1:
        config = configs[0]
    else:
        config = _choose(tune_key, configs, lambda c: run(_scratch(items), c))
    run(items, config)


def prox_(entries, names, table: torch.Tensor | None = None) -> None:
    """One proximal step per weight. entries: (weight, dims, (l1, lg, le), size_weighted,
    exact) with checked weight and dims; names(i, k) names threshold k of weight i. ``table``:
    the thresholds as a checked float64 (T, 3) tensor on the weights' device (the rows of
    entries are then not read)."""
    if not entries:
        return
    device = entries[0][0].device
    if table is None:
        table, maybe = lam_table([e[2] for e in entries], device, names)
    else:
        maybe = [(True, True, True)] * len(entries)
    buckets: dict = {}
    done = []
    for row, (weight, dims, _, size_weighted, exact) in enumerate(entries):
        if weight.numel() == 0 or not any(maybe[row]):
            continue  # bit-identical: nothing to do
        layout = analyze(weight, dims)
        it = Item(weight, layout, row, size_weighted, exact, maybe[row])
        if layout.num_groups == 0 or layout.group_size == 0:
            continue
        buckets.setdefault(_bucket_key(it), []).append(it)
        done.append(it)
    for items in buckets.values():
        _group_by_offset(items, table)
    for it in done:
        finish(it.weight, it.layout)


def _group_by_offset(items: list[Item], table) -> None:
    """Launches a bucket; weights whose address is not a whole number of elements away from the
    first one's (possible only for unusual storage offsets) get launches of their own."""
    size = items[0].layout.work.element_size()
    base = items[0].layout.work.data_ptr()
    same = [it for it in items if (it.layout.work.data_ptr() - base) % size == 0]
    rest = [it for it in items if (it.layout.work.data_ptr() - base) % size != 0]
    flags = tuple(any(it.maybe[k] for it in same) for k in range(3))
    _launch_bucket(same, table, flags)
    if rest:
        _group_by_offset(rest, table)


def group_norms(weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    kept_shape = [s for d, s in enumerate(weight.shape) if d not in dims]
    if weight.numel() == 0:
        return torch.zeros(kept_shape, dtype=weight.dtype, device=weight.device)
    layout = analyze(weight, dims)
    norms = torch.empty(layout.num_groups, dtype=weight.dtype, device=weight.device)
    if layout.num_groups:
        zero = torch.zeros(1, 3, dtype=torch.float64, device=weight.device)
        it = Item(weight, layout, 0, False, False, (False, False, False))
        _launch_bucket([it], zero, (False, False, False), norms=norms)
    return to_kept_shape(norms, weight, dims, layout)


def soft_threshold_(weight: torch.Tensor, lam) -> None:
    """Elementwise over the memory span of a dense weight (a working copy otherwise)."""
    table, maybe = lam_table([(lam, 0.0, 0.0)], weight.device, lambda i, k: "lam")
    if weight.numel() == 0 or not maybe[0][0]:
        return
    work = weight if is_dense(weight) else weight.contiguous()
    block = 1024
    engine.soft_threshold_kernel[(triton.cdiv(work.numel(), block),)](
        work, work.numel(), table, BLOCK=block, WIDE=work.dtype == torch.float64,
        ACC=_acc(work.dtype), num_warps=4)
    if work is not weight:
        weight.copy_(work)
