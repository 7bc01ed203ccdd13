"""GPU benchmark of the Triton kernels: every operator against the eager reference,
torch.compile of the reference (mode max-autotune-no-cudagraphs) and the floor, a
device-to-device copy of the same bytes; plus whole-model parameter lists through foreach_prox_
against a Python loop of single calls.

    make bench-gpu                        # or: python bench/gpu_kernels.py [--out FILE.json]
    python bench/gpu_kernels.py --ops group_shrink_ --dtypes fp32 --shapes rows-4096

Times are medians of triton.testing.do_bench. An in-place step moves 2 x numel x itemsize bytes
(one read, one write), as the copy does; GB/s and "of copy" are computed from those bytes.
Thresholds are small so that the repeated calls of a timing loop leave the data statistically
unchanged. The table is printed and everything is written as JSON with the GPU, torch and
triton versions (bench/RESULTS.md keeps the numbers).

``--tiny`` runs small shapes with a wall-clock timer and without torch.compile: a smoke test
that runs anywhere (on CPU tensors under TRITON_INTERPRET=1), used by tests_kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# name -> (shape, dim)
SHAPES = {
    "rows-64": ((16384, 64), 1),
    "rows-512": ((16384, 512), 1),
    "rows-4096": ((16384, 4096), 1),
    "rows-16384": ((16384, 16384), 1),
    "rows-262144": ((1024, 262144), 1),
    "columns-4096": ((16384, 4096), 0),
    "conv-in-channels": ((512, 512, 3, 3), (0, 2, 3)),
}
TINY_SHAPES = {
    "rows-64": ((16, 64), 1),
    "columns": ((64, 24), 0),
    "conv-in-channels": ((8, 6, 3, 3), (0, 2, 3)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# op -> thresholds (small: repeated application barely moves N(0, 1) data), kwargs
OPS = {
    "group_shrink_": ((1e-4,), {}),
    "soft_threshold_": ((1e-4,), {}),
    "sparse_group_shrink_": ((1e-4, 1e-4), {}),
    "exclusive_shrink_": ((1e-6,), {}),
    "exclusive_shrink_bound": ((1e-8,), dict(exact=False)),
    "cges_shrink_": ((1e-4, 1e-6), {}),
    "group_norms": ((), {}),
}


def _machine() -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    if torch.cuda.is_available() and not INTERPRET:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda)
    else:
        from machine import cpu_name

        info.update(gpu=None, cpu=cpu_name(), interpreter=INTERPRET)
    return info


def _timer(tiny: bool):
    if not tiny:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available() and not INTERPRET:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return bench


def _name(op: str) -> str:
    return "exclusive_shrink_" if op == "exclusive_shrink_bound" else op


def _call(fn, op: str, w, lams, kwargs, dim):
    """A no-argument call of fn, an implementation of operator op, on w."""
    name = _name(op)
    if name == "soft_threshold_":
        return lambda: fn(w, *lams)
    if name == "group_norms":
        return lambda: fn(w, dim)
    return lambda: fn(w, *lams, dim, **kwargs)


def _fastprox_call(op, w, lams, kwargs, dim):
    """fastprox's kernel: the public API on CUDA, the Triton entries directly on CPU tensors
    (under the interpreter)."""
    import fastprox

    if w.is_cuda:
        return _call(getattr(fastprox, _name(op)), op, w, lams, kwargs, dim)
    from fastprox import _checks, kernels

    name = _name(op)
    dims = _checks.normalize_dim(dim, w, name)
    lam_t = [torch.tensor(float(v), dtype=torch.float64) for v in lams]
    flags = {"group_shrink_": ["size_weighted"], "sparse_group_shrink_": ["size_weighted"],
             "exclusive_shrink_": ["exact"], "cges_shrink_": ["size_weighted", "exact"]}
    extra = [kwargs.get(f, True) for f in flags.get(name, [])]
    entry = kernels.ENTRIES[name]
    if name == "soft_threshold_":
        return lambda: entry(w, *lam_t)
    if name == "group_norms":
        return lambda: entry(w, dims)
    return lambda: entry(w, *lam_t, dims, *extra)


def bench_ops(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    from fastprox import reference

    shapes = TINY_SHAPES if args.tiny else SHAPES
    for shape_name in args.shapes or shapes:
        shape, dim = shapes[shape_name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            if INTERPRET and dtype == torch.bfloat16:
                continue  # the interpreter runs bf16 through numpy float32 anyway
            w = torch.randn(shape, device=device).to(dtype)
            src = torch.empty_like(w)
            nbytes = 2 * w.numel() * w.element_size()
            copy_ms = bench(lambda: src.copy_(w))
            for op in args.ops or OPS:
                lams, kwargs = OPS[op]
                row = dict(op=op, shape=list(shape), dim=dim, dtype=dtype_name, bytes=nbytes,
                           copy_ms=copy_ms)
                row["fastprox_ms"] = bench(_fastprox_call(op, w, lams, kwargs, dim))
                ref = getattr(reference, _name(op))
                if not args.no_reference:
                    row["reference_ms"] = bench(_call(ref, op, w, lams, kwargs, dim))
                if not args.tiny and not args.no_compile and \
                        (args.compile_ops is None or op in args.compile_ops) and \
                        (args.compile_dtypes is None or dtype_name in args.compile_dtypes):
                    compiled = torch.compile(ref, mode=args.compile_mode, dynamic=False)
                    fn = _call(compiled, op, w, lams, kwargs, dim)
                    fn()  # compile outside the timing
                    row["compiled_ms"] = bench(fn)
                _derive(row)
                records.append(row)
                save()
                print(_row_line(row), flush=True)
    return records


def _derive(row: dict) -> None:
    t = row["fastprox_ms"]
    row["fastprox_gbps"] = row["bytes"] / t / 1e6
    row["copy_gbps"] = row["bytes"] / row["copy_ms"] / 1e6
    row["of_copy"] = row["copy_ms"] / t
    for k in ("reference", "compiled"):
        if f"{k}_ms" in row:
            row[f"vs_{k}"] = row[f"{k}_ms"] / t


def _row_line(row: dict) -> str:
    get = lambda k, f="{:.3f}": f.format(row[k]) if k in row else "-"  # noqa: E731
    return (f"| {row['op']} | {'x'.join(map(str, row['shape']))} dim={row['dim']} | "
            f"{row['dtype']} | {get('fastprox_ms')} | {get('fastprox_gbps', '{:.0f}')} | "
            f"{get('of_copy', '{:.0%}')} | {get('copy_ms')} | {get('reference_ms')} | "
            f"{get('compiled_ms')} | {get('vs_reference', '{:.1f}x')} | "
            f"{get('vs_compiled', '{:.2f}x')} |")


def _count_launches(fn) -> int:
    from fastprox.kernels import group_engine as engine

    seen = []
    saved = {}
    for name in ("prox_kernel", "split_stats_kernel", "split_apply_kernel",
                 "soft_threshold_kernel"):
        kernel = getattr(engine, name)
        saved[name] = kernel

        class _Count:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid):
                seen.append(grid)
                return self.k[grid]

        setattr(engine, name, _Count(kernel))
    try:
        fn()
    finally:
        for name, kernel in saved.items():
            setattr(engine, name, kernel)
    return len(seen)


def bench_models(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    import fastprox
    from fastprox import reference
    from model_shapes import gpt2_small_weights, resnet50_weights

    models = {"resnet50": resnet50_weights, "gpt2-small": gpt2_small_weights}
    for model, layout in models.items():
        for dtype_name in args.dtypes:
            if INTERPRET and dtype_name == "bf16":
                continue
            dtype = DTYPES[dtype_name]
            shapes = layout()
            if args.tiny:  # the first layers, shrunk
                shapes = [(tuple(max(2, s // 64) for s in shape), d) for shape, d in shapes[:4]]
            weights = [torch.randn(s, device=device).mul_(0.02).to(dtype) for s, _ in shapes]
            dims = [d for _, d in shapes]
            copies = [torch.empty_like(w) for w in weights]
            lam = 1e-6
            nbytes = 2 * sum(w.numel() * w.element_size() for w in weights)
            row = dict(model=model, dtype=dtype_name, tensors=len(weights), bytes=nbytes)
            cuda = weights[0].is_cuda
            if cuda:
                foreach = lambda: fastprox.foreach_prox_(weights, lam_group=lam, dim=dims)  # noqa
            else:  # the Triton entry on CPU tensors (interpreter)
                from fastprox import kernels

                flat = [d for dd in dims for d in ((dd,) if isinstance(dd, int) else dd)]
                counts = [1 if isinstance(d, int) else len(d) for d in dims]
                table = torch.tensor([[0.0, lam, 0.0]] * len(weights), dtype=torch.float64)
                foreach = lambda: kernels.foreach_prox_(  # noqa: E731
                    weights, table, flat, counts, [True] * len(weights), [True] * len(weights))
            row["launches"] = _count_launches(foreach)
            row["foreach_ms"] = bench(foreach)
            if cuda:
                row["loop_ms"] = bench(lambda: [fastprox.group_shrink_(w, lam, d)
                                                for w, d in zip(weights, dims)])
            else:  # the Triton entries on CPU tensors (interpreter)
                single = [_fastprox_call("group_shrink_", w, (lam,), {}, d)
                          for w, d in zip(weights, dims)]
                row["loop_ms"] = bench(lambda: [fn() for fn in single])
            if not args.no_reference:
                row["reference_ms"] = bench(lambda: [reference.group_shrink_(w, lam, d)
                                                     for w, d in zip(weights, dims)])
            row["copy_ms"] = bench(lambda: torch._foreach_copy_(copies, weights))
            row["foreach_gbps"] = nbytes / row["foreach_ms"] / 1e6
            row["of_copy"] = row["copy_ms"] / row["foreach_ms"]
            row["loop_over_foreach"] = row["loop_ms"] / row["foreach_ms"]
            print(f"| {model} | {dtype_name} | {len(weights)} | {row['launches']} | "
                  f"{row['foreach_ms']:.3f} | {row['foreach_gbps']:.0f} | {row['of_copy']:.0%} | "
                  f"{row['loop_ms']:.3f} | {row['loop_over_foreach']:.1f}x |", flush=True)
            records.append(row)
            save()
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, wall clock, no compile")
    parser.add_argument("--ops", nargs="*", choices=list(OPS))
    parser.add_argument("--shapes", nargs="*")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--compile-ops", nargs="*", choices=list(OPS),
                        help="compile the reference for these operators only (default: all)")
    parser.add_argument("--compile-dtypes", nargs="*", choices=list(DTYPES),
                        help="compile the reference in these dtypes only (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "gpu-kernels.json"))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not INTERPRET
    if not cuda and not args.tiny:
        parser.error("needs a CUDA device (or --tiny under TRITON_INTERPRET=1)")
    device = "cuda" if cuda else "cpu"
    bench = _timer(args.tiny)
    machine = _machine()
    print(f"Machine: {machine}")
    print("| operator | weight | dtype | fastprox ms | GB/s | of copy | copy ms | ref ms | "
          "compiled ms | vs ref | vs compiled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    result = dict(machine=machine, ops=[], models=[])

    def save():  # after every row: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    with torch.no_grad():
        bench_ops(args, device, bench, result["ops"], save)
        if not args.no_models:
            print("\n| model | dtype | tensors | launches | foreach ms | GB/s | of copy | loop ms | "
                  "loop / foreach |")
            print("|---|---|---|---|---|---|---|---|---|")
            bench_models(args, device, bench, result["models"], save)
    save()
    print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
