"""Communication of one proximal step on a sharded GPT-2-small-shaped model, measured.

Every 2-D weight of GPT-2 small (12 blocks x 4 Linear weights as (out, in), the token and
position embeddings) is a DTensor sharded Shard(0) over a 1-D mesh, as FSDP2's ``fully_shard``
leaves it. For each proximal step, on gloo (CPU), this measures with
``fastprox.distributed.CollectiveCounter`` the collectives issued and the bytes of their results
on one rank, and the wall time (median), for:

* fastprox: ``fastprox.foreach_prox_`` on the DTensors (groups within shards: nothing; groups
  across shards: one all_reduce of per-group partial sums per step, plus one per Newton step
  of the exact exclusive threshold);
* naive: every weight all-gathered (``full_tensor()``), the unsharded step, the own shard kept;
* floor: one in-place ``mul_`` over every local shard, the one-pass floor of a step on the
  CPU (one read and one write of the rank's weights, no communication).

Also printed: the bytes each rank sends on the wire if the collective runs the ring algorithm
(all_reduce 2(W-1)/W of the buffer; all_gather (W-1)/W of the gathered tensor), an estimate.

    python bench/comm_distributed.py [--world 2] [--dtype fp32|bf16] [--json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import cpu_name

# (name, (out, in)); dim=0 groups a column (an input feature), dim=1 a row (an output unit)
D, VOCAB, CONTEXT = 768, 50257, 1024


def gpt2_small_shapes(tiny: bool = False) -> list[tuple[str, tuple[int, int]]]:
    d, vocab, context, layers = (D, VOCAB, CONTEXT, 12) if not tiny else (24, 101, 16, 2)
    shapes = [("wte", (vocab, d)), ("wpe", (context, d))]
    for i in range(layers):
        shapes += [(f"h.{i}.attn.c_attn", (3 * d, d)), (f"h.{i}.attn.c_proj", (d, d)),
                   (f"h.{i}.mlp.c_fc", (4 * d, d)), (f"h.{i}.mlp.c_proj", (d, 4 * d))]
    return shapes


# name -> (foreach_prox_ arguments, per weight dim); thresholds are lr * lam of one step
SETTINGS = {
    "group lasso, rows (dim=1)": (dict(lam_group=1e-3), 1),
    "group lasso, columns (dim=0)": (dict(lam_group=1e-3), 0),
    "sparse group lasso, columns": (dict(lam_l1=1e-4, lam_group=1e-3), 0),
    "CGES (bound), columns": (dict(lam_group=1e-3, lam_exclusive=1e-3, size_weighted=False,
                                   exact=False), 0),
    "exclusive exact, columns": (dict(lam_exclusive=1e-3), 0),
}


def _sharded(shape, mesh, dtype, seed):
    """A Shard(0) DTensor of ``shape``, built from its local rows (torch.chunk's split)."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = shape[0]
    chunk = -(-rows // world)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    local = torch.randn((stop - start, shape[1]), generator=g).to(dtype) * 0.02
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))


def _naive_step(weights, kwargs, dim):
    """All-gather each weight, run the unsharded step, keep the own shard."""
    import fastprox

    for w in weights:
        full = w.full_tensor()
        fastprox.foreach_prox_([full], dim=dim, **kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
        chunk = -(-full.shape[0] // world)
        w.to_local().copy_(full[rank * chunk:(rank + 1) * chunk])


def _measure(fn, restore, repeats: int):
    """The collectives of one call, and the median time of ``repeats`` more, each from the
    same weights (restored, untimed)."""
    from fastprox.distributed import CollectiveCounter

    restore()
    with CollectiveCounter() as comm:
        fn()
    times = []
    for _ in range(repeats):
        restore()
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return comm.records, statistics.median(times)


def _worker(rank, world, store, dtype_name, tiny, repeats, out_path):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = _rows(world, dtype_name, tiny, repeats)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    _teardown()


def _teardown() -> None:
    """Ends this rank with no gloo thread racing the interpreter's shutdown.

    DTensor's caches (sharding propagation, redistribute plans) keep the DeviceMesh, and so the
    gloo process group and its worker threads, alive past ``destroy_process_group`` until the
    interpreter shuts down. A worker thread releases each finished collective's work (and the
    tensors it holds) just after the rank saw it complete; when that release happens while the
    interpreter is finalizing, the thread must take the GIL, CPython ends it with a forced
    unwind, which crosses a noexcept destructor: std::terminate, "terminate called without an
    active exception", SIGABRT. So the ranks meet (every collective done on both), the group is
    destroyed, and the process ends without finalizing (its results are written and flushed).
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rows(world, dtype_name, tiny, repeats) -> dict:
    """The measurements of one rank (the mesh and every DTensor live only in here)."""
    import fastprox  # noqa: F401  (kernels)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    shapes = gpt2_small_shapes(tiny)
    weights = [_sharded(s, mesh, dtype, i) for i, (_, s) in enumerate(shapes)]
    saved = [w.to_local().clone() for w in weights]

    def restore():
        for w, s in zip(weights, saved):
            w.to_local().copy_(s)
    def floor():
        for w in weights:
            w.to_local().mul_(0.999)

    _, floor_s = _measure(floor, restore, repeats)
    rows = []
    for name, (kwargs, dim) in SETTINGS.items():
        for impl in ("fastprox", "naive all-gather"):
            if impl == "fastprox":
                def fn():
                    fastprox.foreach_prox_(weights, dim=dim, **kwargs)
            else:
                def fn():
                    _naive_step(weights, kwargs, dim)
            records, seconds = _measure(fn, restore, repeats)
            if impl == "fastprox":
                ours = [w.to_local().clone() for w in weights]
                difference = 0.0
            else:  # both started from the same weights: the results must agree
                difference = max((w.to_local().float() - o.float()).abs().max().item()
                                 if o.numel() else 0.0 for w, o in zip(weights, ours))
            wire = sum(size * (2 if "allreduce" in op or "all_reduce" in op else 1)
                       * (world - 1) / world for op, size in records)
            rows.append(dict(setting=name, impl=impl, collectives=len(records),
                             result_bytes=sum(size for _, size in records),
                             ring_bytes_sent=wire, ms=seconds * 1e3,
                             max_abs_difference=difference))
    params = sum(s[0] * s[1] for _, s in shapes)
    return dict(world=world, dtype=dtype_name, params=params, weights=len(shapes),
                floor_ms=floor_s * 1e3, rows=rows)


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo"


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n < 1e7 else f"{n / 1e6:.0f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args.dtype, args.tiny,
                                args.repeats, out), nprocs=args.world)
        with open(out) as f:
            result = json.load(f)
    result["machine"] = _machine()
    print(f"Machine: {result['machine']}; {args.world} ranks, {args.dtype}, "
          f"{result['weights']} weights, {result['params'] / 1e6:.1f} M parameters, Shard(0); "
          f"floor (in-place mul_ of the shards): {result['floor_ms']:.1f} ms\n")
    print("| step | implementation | collectives | MB (results, one rank) | MB sent (ring) "
          "| ms | x floor | naive / fastprox bytes | max abs. difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["setting"], r["impl"]): r for r in result["rows"]}
    for r in result["rows"]:
        naive = by_key[(r["setting"], "naive all-gather")]["result_bytes"]
        ratio = (f"{naive / r['result_bytes']:.0f}x" if r["impl"] == "fastprox"
                 and r["result_bytes"] else "")
        print(f"| {r['setting']} | {r['impl']} | {r['collectives']} | {_mb(r['result_bytes'])} "
              f"| {_mb(r['ring_bytes_sent'])} | {r['ms']:.1f} | {r['ms'] / result['floor_ms']:.1f} "
              f"| {ratio} "
              f"| {r['max_abs_difference']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
