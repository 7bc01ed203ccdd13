"""foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted, exact)
on CUDA: the fused step in an Adam step's diagonal metric. Per weight i with (l1, lg, le) =
lams[i] and (s, eps, lr) = metric[i]:

    d = (sqrt(v * s) + eps) / lr                  (v = moments[i], s = 1 / (1 - beta2^t))
    W <- metric soft threshold by l1 / d, metric group step by t = lg * c, metric exclusive
         step by le (exact threshold, or CGES's bound)                    (a lam of 0: skipped)

Weights are bucketed as for foreach_prox_ (kernels/launch.py), each bucket one launch of
``metric_kernel`` (kernels/metric_kernels.py), planned here: a group that fits the tile is read
once from the weight and the moment into registers, solved there by Newton's method, written
once. A step over the same weights and moments as a step before launches that step's plan
(kernels/kept_plans.py). The tables are read on the host (every check before any launch): the
step is not captured in CUDA graphs. Contract: docs/SPEC.md; reference: fastprox/reference.py
(foreach_metric_prox_op); CPU: csrc/cpu/metric_prox.cpp.
"""

from __future__ import annotations

import math

import torch
import triton

from . import kept_plans, launch, tiles
from .layout import GroupLayout, analyze
from .tables import Item, Tables, by_offset, check_moments, persistent, split_dims
from .tiles import (acc_type, address, choose_tile, elems_per_thread, fits, is_off64,
                    loop_tile, p2, sm_count, tile_cap, vector_width, warp_configs)

_OP = "foreach_metric_prox_"


# ---------------------------------------------------------------------------------------------
# Plans and runs: each weight with its second moment, laid out alike; buckets as for the fused
# step (kernels/launch.py), one launch of metric_kernel (kernels/metric_kernels.py) per bucket.

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
                tables: Tables) -> tuple[list[launch.Launch], tuple]:
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
    meta, blocks, num_blocks, grid = persistent(items, tile, sms, tables)
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
                      DO_EXCL=flags[2], WIDE=wide, ACC=acc_type(work.dtype))
    configs = warp_configs(paths, wide, vec, 8 if fit_mode != 1 else tiles.MAX_WARPS[wide])
    n_key = p2(max(lay.group_size for lay in layouts)).bit_length()
    g_key = p2(sum(lay.num_groups for lay in layouts)).bit_length()
    tune_key = ("metric", work.dtype, mom.dtype, tile, tuple(flags), n_key, g_key, vec,
                fit_mode, str(work.device))
    return [launch.Launch("metric_kernel", (grid,), args, constexprs, configs)], tune_key


def _by_offsets(items: list[Item]) -> list[list[Item]]:
    """_by_offset for the weights and for their moments: a launch addresses both from its first
    item's."""
    out = []
    for same in by_offset(items):
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
    key = kept_plans.step_key("metric", device, sms, (
        kept_plans.tensor_key(w) + kept_plans.tensor_key(v) + (tuple(d), sw, ex, m)
        for (w, v, d, sw, ex), m in zip(entries, maybe)))
    tensors = {"lams": table, "metric": metric}
    if kept_plans.launch_kept(key, lambda name: tensors[name] if name in tensors
                              else entries[name[1]][name[0]]):
        return  # planned before: only the launches
    tables = Tables(device, upload=True)
    plans = plan_metric_step(entries, maybe, table, metric, sms, tables)
    runs = []
    for items, flags, launches, tune_key in plans:
        config = launch.run_bucket(
            items, launches, tune_key,
            lambda its, f=flags: plan_metric(its, table, metric, f, sms, tables)[0])
        first = items[0]
        runs.append(kept_plans.kept_run(
            launches, {id(first.layout.work): (0, first.row), id(first.moment): (1, first.row),
                       id(table): "lams", id(metric): "metric"}, config))
    moments_copied = any(it.moment is not entries[it.row][1] for p in plans for it in p[0])
    launch.keep_or_finish(None if moments_copied else key, plans, runs)


# ---------------------------------------------------------------------------------------------
# The op: its tables checked, then the step.

def _rows(table, n: int, name: str) -> list[list[float]]:
    if not (isinstance(table, torch.Tensor) and table.dtype == torch.float64
            and table.numel() == 3 * n):
        raise ValueError(f"{_OP}: {name} must be a float64 tensor of 3 * len(weights) values")
    return table.reshape(n, 3).tolist()


def foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted,
                         exact, names=None, moments_checked=False):
    op = _OP
    n = len(weights)
    if len(moments) != n or len(dim_counts) != n or len(size_weighted) != n or len(exact) != n:
        raise ValueError(f"{op}: moments, dim_counts, size_weighted and exact need one entry "
                         "per weight")
    if names is not None and len(names) != n:
        raise ValueError(f"{op}: names needs one entry per weight")
    label = (lambda i: names[i]) if names is not None else (lambda i: f"moments[{i}]")
    lam_rows, metric_rows = _rows(lams, n, "lams"), _rows(metric, n, "metric")
    tensor_dims = split_dims(weights, dims, dim_counts)
    for i, (w, v) in enumerate(zip(weights, moments)):
        if v.shape != w.shape:
            raise ValueError(f"{op}: {label(i)} has shape {tuple(v.shape)}, expected "
                             f"{tuple(w.shape)}")
        if v.device != w.device or not v.is_floating_point():
            raise ValueError(f"{op}: {label(i)} must be a floating tensor on {w.device}")
        if not all(math.isfinite(x) and x >= 0 for x in lam_rows[i]):
            raise ValueError(f"{op}: lams[{i}] must be finite numbers >= 0")
        s, eps, lr = metric_rows[i]
        if not (all(math.isfinite(x) for x in (s, eps, lr)) and s >= 0 and eps >= 0 and lr > 0):
            raise ValueError(f"{op}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
    used = [i for i in range(n) if weights[i].numel() and any(lam_rows[i])]
    check_moments(op, moments, used, weights, label, lambda j: f"weights[{j}]",
                  "(a second moment is finite and >= 0); the optimizer's state is damaged: "
                  "check the loss and gradients for NaN/inf, or reload a checkpoint",
                  values=not moments_checked)
    metric_([(w, v, d, sw, ex) for w, v, d, sw, ex in
                    zip(weights, moments, tensor_dims, size_weighted, exact)],
                   lam_rows, metric_rows)
