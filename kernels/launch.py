"""Plans and launches of the CUDA kernels' fused step: what the GPU runs, computed on the host
from layouts alone (the same plans are compiled ahead of time, without a GPU, by
bench/compile_gate.py, on meta tensors), and the runs. The kernels are in
kernels/prox_kernels.py, phase_kernels.py, metric_kernels.py and coupled_kernels.py (KERNELS,
by name), tiles and tuning in kernels/tiles.py, tables in kernels/tables.py.

Every in-place operator, one weight or a list, goes through ``prox_``: weights are bucketed by
dtype, tile shape and alignment, and each bucket is one launch of ``prox_kernel`` (two for the
split path), whatever the number of weights in it; a step over the same weights as a step
before launches that step's plan without planning again (kernels/kept_plans.py). Nothing here
synchronises with the GPU except the check of thresholds given as CUDA tensors outside CUDA
graph capture. The phases of
coupled steps (kernels/group_phases.py) and the metric step (kernels/metric_prox.py) plan their
launches from the same buckets and tables and run them here (``run_bucket``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from . import coupled_kernels, kept_plans, metric_kernels, phase_kernels, prox_kernels, tiles
from .layout import GroupLayout, analyze, finish, is_dense, to_kept_shape
from .tables import Item, Tables, block_tables, by_offset, lam_table, persistent
from .tiles import (acc_type, address, choose_tile, elems_per_thread, fits, is_off64,
                    loop_tile, p2, sm_count, split_rows, takes_split, tile_cap, vector_width,
                    warp_configs)

def bucket_key(it: Item):
    lay = it.layout
    tile, vec = choose_tile(lay, lay.work)
    return (lay.work.dtype, tile, vec > 1, is_off64(lay))


# ---------------------------------------------------------------------------------------------
# Launch plans: what the GPU runs, computed on the host from layouts alone. The same plans are
# compiled ahead of time, without a GPU, by bench/compile_gate.py (on meta tensors).

# The kernels a Launch names (a name, so that a plan can be compiled in another process: the
# compile gate).
KERNELS = {
    "prox_kernel": prox_kernels.prox_kernel,
    "split_stats_kernel": prox_kernels.split_stats_kernel,
    "split_apply_kernel": prox_kernels.split_apply_kernel,
    "soft_threshold_kernel": prox_kernels.soft_threshold_kernel,
    "phase_kernel": phase_kernels.phase_kernel,
    "metric_kernel": metric_kernels.metric_kernel,
    "coupled_metric_kernel": coupled_kernels.coupled_metric_kernel,
}


@dataclasses.dataclass
class Launch:
    kernel: str              # a name in KERNELS
    grid: tuple
    args: tuple              # run-time arguments, in order (tensors and ints)
    constexprs: dict
    configs: list            # launch configurations ({"num_warps": w}); timed when several

    def run(self, config):
        KERNELS[self.kernel][self.grid](*self.args, **self.constexprs, **config)

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
                  ACC=acc_type(work.dtype))
    n_key = p2(max(lay.group_size for lay in layouts)).bit_length()
    g_key = p2(sum(lay.num_groups for lay in layouts)).bit_length()
    tune_key = ("split" if split else "fused", work.dtype, tile, flags, norms is not None,
                n_key, g_key, vec, str(work.device))
    if split:
        rows = split_rows(tile, tile_cap(wide, vec, off64, 8)) if not tiles.INTERPRET else 4
        key, build = block_tables(items, (rows, bg, bi), rows)
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
                       dict(**shape, **common, CHUNKS_P2=min(p2(chunks), 64),
                            DO_GROUP=do_group), configs)], tune_key
    meta, blocks, num_blocks, grid = persistent(items, tile, sms, tables)
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
    configs = warp_configs(paths, wide, vec, 8 if fit_mode != 1 else tiles.MAX_WARPS[wide])
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
        buckets.setdefault(bucket_key(it), []).append(it)
    plans = []
    for items in buckets.values():
        for same in by_offset(items):
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
    return Launch("soft_threshold_kernel", (triton.cdiv(work.numel(), tiles.SOFT_BLOCK),),
                  (work, work.numel() // vec, table),
                  dict(BLOCK=tiles.SOFT_BLOCK, VEC=vec, WIDE=wide, ACC=acc_type(work.dtype)),
                  warp_configs([(tiles.SOFT_BLOCK, elems_per_thread(wide, vec, False))], wide,
                               vec)[:1])

# ---------------------------------------------------------------------------------------------
# Runs. A bucket with several launch configurations is tuned once per key (group size and
# group count, rounded to powers of two) on scratch copies: the kernels work in place.

def scratch(items: list[Item]) -> list[Item]:
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


def run_bucket(items, launches: list[Launch], tune_key, replan) -> dict:
    """Runs a bucket's launches with the configuration tuned for its key (returned); replan(items)
    gives the launches of the same bucket for other tensors (the scratch copies of a trial)."""
    configs = launches[0].configs
    if len(configs) == 1:
        config = configs[0]
    else:
        def trial(c):
            for launch in replan(scratch(items)):
                launch.run(c)
        config = tiles.choose_config(tune_key, configs, trial)
    for launch in launches:
        launch.run(config)
    return config


def keep_or_finish(key, plans, runs) -> None:
    """After a planned step: the working copies written back into their weights; the plan kept
    under ``key`` (kernels/kept_plans.py) when there were none (and ``key`` is not None)."""
    copies = False
    for items, _, _, _ in plans:
        for it in items:
            copies |= it.layout.is_copy
            finish(it.weight, it.layout)
    if key is not None and not copies:
        kept_plans.plans.keep(key, runs)


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
    key = kept_plans.step_key("prox", device, sms, (
        kept_plans.tensor_key(w) + (tuple(d), sw, ex, m)
        for (w, d, _, sw, ex), m in zip(entries, maybe)))
    if kept_plans.launch_kept(key, lambda name: table if name == "lams" else entries[name][0]):
        return  # planned before: only the launches
    tables = Tables(device, upload=True)
    plans = plan_prox(entries, table, maybe, sms, tables)
    runs = []
    for items, flags, launches, tune_key in plans:
        config = run_bucket(items, launches, tune_key,
                            lambda its, f=flags: plan_bucket(its, table, f, sms, tables)[0])
        runs.append(kept_plans.kept_run(
            launches, {id(items[0].layout.work): items[0].row, id(table): "lams"}, config))
    keep_or_finish(key, plans, runs)

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
