"""The tables of the CUDA kernels' launches, built on the host: the thresholds of a step
(checked; values held on the GPU stay there), the per-tensor table (offsets from the bucket's
first weight, shapes, thresholds row) and the block table of a bucket, uploaded once per
distinct launch and reused (a step captured in a CUDA graph after one eager call of the same
step uploads nothing and reads nothing back), and the grid of a persistent launch.
"""

from __future__ import annotations

import collections
import math

import torch
import triton

from . import tile_ops, tiles
from .tiles import address, capturing

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


def check_moments(op: str, moments, used, writes, label, write_label, damaged: str,
                  values: bool = True) -> dict:
    """The moments ``used`` (their indices) of a metric step, checked before anything runs:
    apart from every tensor the step writes (``writes``, named by ``write_label``) and, with
    ``values``, finite and >= 0 (one reduction each, all the bounds read on the host in one
    transfer); ``damaged`` ends the error of one that is not. Returns the largest value of each
    (none without ``values``)."""
    ranges = [address_range(w) for w in writes]
    for i in used:
        lo, hi = address_range(moments[i])
        for j, (wlo, whi) in enumerate(ranges):
            if lo < whi and wlo < hi:
                raise ValueError(f"{op}: {label(i)} shares memory with {write_label(j)}, which "
                                 "the step writes")
    top = {}
    if used and values:
        bounds = torch.stack([torch.stack(torch.aminmax(moments[i])).double()
                              for i in used]).tolist()
        for i, (lo, hi) in zip(used, bounds):
            if not (lo >= 0 and hi < math.inf):
                raise ValueError(f"{op}: {label(i)} has negative, NaN or infinite entries "
                                 f"{damaged}")
            top[i] = hi
    return top


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
# Per-tensor and block tables of a bucket.

class Item:
    """One weight of a launch: its layout, thresholds row and flags (and, for the metric step,
    its second moment laid out like the layout's working tensor)."""

    __slots__ = ("weight", "layout", "row", "size_weighted", "exact", "maybe", "moment")

    def __init__(self, weight, layout, row, size_weighted, exact, maybe, moment=None):
        self.weight, self.layout, self.row = weight, layout, row
        self.size_weighted, self.exact, self.maybe = size_weighted, exact, maybe
        self.moment = moment


def block_tables(items: list[Item], tile, split_rows: int):
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
        meta = torch.zeros(len(items), tile_ops.META_COLS.value, dtype=torch.int64)
        ts, locals_ = [], []
        out = 0
        for t, it in enumerate(items):
            lay = it.layout
            per_batch = triton.cdiv(lay.groups, bg)
            chunks = triton.cdiv(lay.outer, split_rows) if split_rows else 1
            meta[t, tile_ops.META_OFFSET.value] = (address(lay.work) - address(base)) // size
            meta[t, tile_ops.META_OUTER.value] = lay.outer
            meta[t, tile_ops.META_GROUPS.value] = lay.groups
            meta[t, tile_ops.META_INNER.value] = lay.inner
            meta[t, tile_ops.META_BLOCKS.value] = per_batch
            meta[t, tile_ops.META_OUT.value] = out
            c = math.sqrt(lay.group_size) if it.size_weighted else 1.0
            meta[t, tile_ops.META_C.value] = torch.tensor(c, dtype=torch.float64).view(torch.int64)
            meta[t, tile_ops.META_EXACT.value] = int(it.exact)
            meta[t, tile_ops.META_CHUNKS.value] = chunks
            meta[t, tile_ops.META_LAM.value] = it.row
            count = lay.batch * per_batch
            ts.append(torch.full((count,), t, dtype=torch.int32))
            locals_.append(torch.arange(count, dtype=torch.int32))
            out += lay.num_groups
        blocks = torch.stack([torch.cat(ts), torch.cat(locals_)])
        return meta, blocks

    return tuple(key), build


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


def persistent(items: list[Item], tile, sms: int, tables: Tables):
    """(meta, blocks, number of blocks, grid) of a persistent launch over a bucket's blocks."""
    key, build = block_tables(items, tile, 0)
    meta, blocks = tables.get(key, build)
    num_blocks = blocks.shape[1]
    grid = max(1, min(num_blocks, tiles.PROGRAMS_PER_SM * sms))
    if tiles.INTERPRET:
        grid = min(num_blocks, 3)  # a few programs: the persistent loop is exercised
    return meta, blocks, num_blocks, grid


def by_offset(items: list[Item]) -> list[list[Item]]:
    """A bucket's weights by launch: those whose address is not a whole number of elements away
    from the first one's (possible only for unusual storage offsets) get launches of their
    own."""
    size = items[0].layout.work.element_size()
    base = address(items[0].layout.work)
    same = [it for it in items if (address(it.layout.work) - base) % size == 0]
    rest = [it for it in items if (address(it.layout.work) - base) % size != 0]
    return [same] + (by_offset(rest) if rest else [])
