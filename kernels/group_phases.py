"""The phase ops on CUDA, for steps whose groups lie in several places (fastprox/_phases.py:
coupled groups across tensors, groups across shards). Per weight W, its groups given by dims,
y = soft(W, lam_l1):

    foreach_group_sums(Ws, dims, dim_counts, lam_l1, what) -> per W, (k, *kept): per group,
        what & 1: sum y^2; what & 2: sum |y| and count(|y| > 0)   (k rows, in that order)
    foreach_group_sums_above(Ws, dims, dim_counts, lam_l1, scales, taus) -> per W, (2, *kept):
        per group, with m = |y| * scale_g (None: 1), the sum and the count of the m > tau_g
    foreach_group_rewrite_(Ws, dims, dim_counts, lam_l1, scales, taus): per group,
        W_g <- sign(y) * max(|y| * scale_g - tau_g, 0)               (None: 1, 0)

Sums in float32 (float64 for float64 weights); per-group values shaped like the kept
dimensions, on the weights' device. Weights are bucketed as for the step (kernels/launch.py),
one launch of ``phase_kernel`` (kernels/phase_kernels.py) per bucket, planned here: one read of
each weight for the sums, one read and one write for the rewrite; every check before any
launch. Contract: docs/SPEC.md; reference: fastprox/reference.py; CPU:
csrc/cpu/group_phases.cpp.
"""

from __future__ import annotations

import math

import torch
import triton

from . import launch, phase_kernels
from .layout import GroupLayout, analyze, finish, to_kept_shape
from .tables import Item, Tables, by_offset, persistent, split_dims, uploads
from .tiles import (acc_type, choose_tile, elems_per_thread, is_off64, loop_tile, sm_count,
                    tile_cap, vector_width, warp_configs)


# ---------------------------------------------------------------------------------------------
# Plans and runs: the same buckets and tables as the fused step (kernels/launch.py), one launch
# of phase_kernel (kernels/phase_kernels.py) per bucket.

PHASE_SUMS, PHASE_ABOVE, PHASE_REWRITE = (phase_kernels.PHASE_SUMS.value,
                                          phase_kernels.PHASE_ABOVE.value,
                                          phase_kernels.PHASE_REWRITE.value)
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
        buckets.setdefault(launch.bucket_key(it), []).append(it)
    return [PhaseBucket(same) for items in buckets.values() for same in by_offset(items)]


def plan_phase(bucket: PhaseBucket, l1s: torch.Tensor, phase: int, params: torch.Tensor,
               out: torch.Tensor, sms: int, tables: Tables) -> launch.Launch:
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
    meta, blocks, num_blocks, grid = persistent(items, tile, sms, tables)
    per = elems_per_thread(wide, vec, off64)
    configs = warp_configs([(lo * bg * li, per // 2)], wide, vec, 8)[:1]
    args = (work, meta, l1s, blocks, params, out, num_blocks, triton.cdiv(num_blocks, grid),
            bucket.total)
    constexprs = dict(LOOP_O=lo, BLOCK_G=bg, LOOP_I=li, BLOCK_I=bi, VEC=vec, OFF64=off64,
                      PHASE=phase, WIDE=wide, ACC=acc_type(work.dtype))
    return launch.Launch("phase_kernel", (grid,), args, constexprs, configs)


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
# The ops: their tables checked, then the phase.

def _check(op, weights, dims, dim_counts, lam_l1, values=(), needed=None):
    """The tables of a phase op checked (its weights arrive checked: fastprox/_triton.py),
    before anything runs; (layouts, l1s, dims), the layouts of the ``needed`` weights only (all
    by default)."""
    n = len(weights)
    if len(dim_counts) != n or len(lam_l1) != n:
        raise ValueError(f"{op}: dim_counts and lam_l1 need one entry per weight")
    for name, vs in values:
        if len(vs) != n:
            raise ValueError(f"{op}: {name} need one entry per weight")
    tensor_dims = split_dims(weights, dims, dim_counts)
    l1s = []
    for i, lam in enumerate(lam_l1):
        lam = float(lam)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"{op}: lam_l1[{i}] must be a finite number >= 0, got {lam}")
        l1s.append(lam)
    for name, vs in values:
        for i, (w, d, v) in enumerate(zip(weights, tensor_dims, vs)):
            if v is None:
                continue
            groups = math.prod(s for k, s in enumerate(w.shape) if k not in d)
            if not isinstance(v, torch.Tensor) or v.numel() != groups:
                got = v.numel() if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{op}: {name}[{i}] has {got} values for {groups} groups")
            if v.device != w.device:
                raise ValueError(f"{op}: {name}[{i}] is on {v.device} but weights[{i}] is on "
                                 f"{w.device}")
    return phase_layouts(list(zip(weights, tensor_dims)), needed), l1s, tensor_dims


def _values(weights, layouts, scales, taus):
    """Per weight, its (scale, tau) in group order (None where not given)."""
    out = []
    for w, lay, s, t in zip(weights, layouts, scales, taus):
        if lay is None:
            out.append(None)
            continue
        out.append(tuple(None if v is None else to_group_order(v, w, lay)
                         for v in (s, t)))
    return out


def _kept(sums, weights, tensor_dims, layouts, rows):
    """Per weight, its sums in group order -> (k, *kept) in logical order (zeros for a weight
    without groups or elements)."""
    out = []
    for w, d, lay, part in zip(weights, tensor_dims, layouts, sums):
        kept = [s for k, s in enumerate(w.shape) if k not in d]
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        if lay is None:
            out.append(torch.zeros([len(rows), *kept], dtype=acc, device=w.device))
            continue
        order = list(lay.kept_in_group_order)
        if order == sorted(order):  # group order is the logical order: a view of the rows
            out.append(part[rows[0]:rows[-1] + 1].view([len(rows), *kept]))
        else:
            out.append(torch.stack([to_kept_shape(part[r], w, d, lay) for r in rows]))
    return out


def foreach_group_sums(weights, dims, dim_counts, lam_l1, what):
    op = "foreach_group_sums"
    if what not in (1, 2, 3):
        raise ValueError(f"{op}: what must be 1, 2 or 3, got {what}")
    layouts, l1s, tensor_dims = _check(op, weights, dims, dim_counts, lam_l1)
    sums = phase_(list(weights), layouts, l1s, PHASE_SUMS)
    rows = ([0] if what & 1 else []) + ([1, 2] if what & 2 else [])
    return _kept(sums, weights, tensor_dims, layouts, rows)


def foreach_group_sums_above(weights, dims, dim_counts, lam_l1, scales, taus):
    op = "foreach_group_sums_above"
    if any(t is None for t in taus):
        raise ValueError(f"{op}: taus need a tensor per weight")
    layouts, l1s, tensor_dims = _check(op, weights, dims, dim_counts, lam_l1,
                                       (("scales", scales), ("taus", taus)))
    sums = phase_(list(weights), layouts, l1s, PHASE_ABOVE,
                         _values(weights, layouts, scales, taus))
    return _kept(sums, weights, tensor_dims, layouts, [0, 1])


def foreach_group_rewrite_(weights, dims, dim_counts, lam_l1, scales, taus):
    op = "foreach_group_rewrite_"
    # nothing to do for a weight without a scale, a threshold or lam_l1: bit-identical, and
    # not analyzed (no working copy)
    needed = [s is not None or t is not None or float(lam) > 0
              for s, t, lam in zip(scales, taus, lam_l1)]
    layouts, l1s, _ = _check(op, weights, dims, dim_counts, lam_l1,
                             (("scales", scales), ("taus", taus)), needed)
    phase_(list(weights), layouts, l1s, PHASE_REWRITE,
                  _values(weights, layouts, scales, taus))
