"""GPU benchmark (do_bench) of the harness's cases (bench/harness.py): fastprox, the user's eager
PyTorch, torch.compile of it (mode max-autotune-no-cudagraphs) and the floor, a
device-to-device copy of the same bytes; plus whole-model parameter lists through foreach_prox_
against a Python loop of single calls and the user's eager loop, and the coupled step of
ResNet-50's and GPT-2 small's coupled groups against the per-tensor step and the copy floor,
and the step in an Adam step's metric on their weights and second moments against the Euclidean
step, the float64 reference and its floor (one read of both, one write); and the regularizer's
proximal step on GPT-2, Llama and ResNet-50 trained with AdamW beside the AdamW step and the
training step.

    make bench-gpu                        # or: python bench/gpu_kernels.py [--out FILE.json]
    python bench/gpu_kernels.py --ops group_shrink_ --dtypes fp32 --shapes rows-4096

Times are medians of triton.testing.do_bench. An in-place step moves 2 x numel x itemsize bytes
(one read, one write), as the copy does. The thresholds are the table's bench samples times
``GPU_SCALE``: the repeated calls of a timing loop then leave the data statistically unchanged.
The table (harness.report) is printed and everything is written as JSON with the machine
(bench/RESULTS.md keeps the numbers).

``--tiny`` runs small shapes with a wall-clock timer and without torch.compile: a smoke test
that runs anywhere (on CPU tensors under TRITON_INTERPRET=1, through the Triton entries), used
by tests_kernels.
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

import harness  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
GPU_SCALE = 1e-3
MODEL_LAM = 1e-6


def _machine() -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())
    if torch.cuda.is_available() and not INTERPRET:
        props = torch.cuda.get_device_properties(0)
        info.update(name=harness.gpu_machine(), gpu=props.name, sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    else:
        info.update(name=f"{harness.cpu_machine()}, Triton interpreter", gpu=None,
                    interpreter=INTERPRET)
    return info


def _timer(tiny: bool):
    """fn -> median seconds."""
    if not tiny:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100,
                                                  return_mode="median") / 1e3

    def bench(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available() and not INTERPRET:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return bench


def bench_ops(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    shapes = harness.SHAPES_TINY if args.tiny else harness.SHAPES_GPU
    for shape_name in args.shapes or shapes:
        shape, dim = shapes[shape_name]
        for dtype_name in args.dtypes:
            dtype = harness.DTYPES[dtype_name]
            if INTERPRET and dtype == torch.bfloat16:
                continue  # the interpreter runs bf16 through numpy float32 anyway
            w = torch.randn(shape, device=device).to(dtype)
            src = torch.empty_like(w)
            floor_s = bench(lambda: src.copy_(w))
            for label in args.ops or harness.BY_LABEL:
                case = harness.BY_LABEL[label].scaled(GPU_SCALE)
                row = dict(op=label, weight=f"{'x'.join(map(str, shape))} dim={dim}",
                           shape=list(shape), dim=dim, dtype=dtype_name,
                           bytes=case.moves(w.numel(), w.element_size()),
                           floor_bytes=2 * w.numel() * w.element_size(), floor_s=floor_s)
                fastprox = case.fastprox()
                row["fastprox_s"] = bench(lambda: fastprox(w, dim))
                eager = case.eager()
                row["eager_s"] = bench(lambda: eager(w, dim))
                if not args.tiny and not args.no_compile and \
                        (args.compile_ops is None or label in args.compile_ops) and \
                        (args.compile_dtypes is None or dtype_name in args.compile_dtypes):
                    compiled = torch.compile(eager, mode=args.compile_mode, dynamic=False)
                    compiled(w, dim)  # compile outside the timing
                    row["compiled_s"] = bench(lambda: compiled(w, dim))
                records.append(harness.derive(row))
                save()
                print(harness.report("", "", [row]).splitlines()[-1], flush=True)
    return records


def _count_launches(fn) -> int:
    from fastprox.kernels.launch import KERNELS

    seen = []
    saved = {}
    for name in ("prox_kernel", "split_stats_kernel", "split_apply_kernel",
                 "soft_threshold_kernel"):
        kernel = KERNELS[name]
        saved[name] = kernel

        class _Count:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid):
                seen.append(grid)
                return self.k[grid]

        KERNELS[name] = _Count(kernel)
    try:
        fn()
    finally:
        for name, kernel in saved.items():
            KERNELS[name] = kernel
    return len(seen)


def _model_lists(args, device, skip=()):
    """(model, dtype name, (shape, dim) list, weights) of ResNet-50 and GPT-2 small in each
    dtype asked (the first layers, shrunk, with --tiny; no bf16 under the interpreter)."""
    from model_shapes import gpt2_small_weights, resnet50_weights

    models = {"resnet50": resnet50_weights, "gpt2-small": gpt2_small_weights}
    for model, layout in models.items():
        for dtype_name in args.dtypes:
            if dtype_name in skip or (INTERPRET and dtype_name == "bf16"):
                continue
            shapes = layout()
            if args.tiny:
                shapes = [(tuple(max(2, s // 64) for s in shape), d) for shape, d in shapes[:4]]
            weights = [torch.randn(s, device=device).mul_(0.02).to(harness.DTYPES[dtype_name])
                       for s, _ in shapes]
            yield model, dtype_name, shapes, weights


def bench_models(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    for model, dtype_name, shapes, weights in _model_lists(args, device):
        dims = [d for _, d in shapes]
        copies = [torch.empty_like(w) for w in weights]
        steps = harness.model_steps(dims, MODEL_LAM)
        row = dict(model=model, dtype=dtype_name, tensors=len(weights),
                   bytes=2 * sum(w.numel() * w.element_size() for w in weights))
        row["launches"] = _count_launches(lambda: steps["foreach"](weights))
        for impl in ("foreach", "loop", "eager"):
            row[f"{impl}_s"] = bench(lambda: steps[impl](weights))
        row["floor_s"] = bench(lambda: torch._foreach_copy_(copies, weights))
        records.append(row)
        save()
        print(harness.report("", "", [], [row]).splitlines()[-1], flush=True)
    return records


def _base(model, tensor):
    """The parameter of ``model`` whose storage ``tensor`` (a member, maybe a view) uses."""
    for p in model.parameters():
        if p.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            return p
    raise LookupError("a member that is no parameter of the model")


def bench_coupled(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    """Group lasso on every coupled set of ResNet-50 (channels) and GPT-2 small (heads and
    neurons), float32, against group lasso per tensor on the same weights (foreach_prox_) and a
    device-to-device copy of every tensor the sets touch. Discovery needs Torch-Pruning (and
    transformers for GPT-2): a model whose packages are missing is recorded as skipped, with
    the reason."""
    import fastprox

    for model in (["resnet-tiny"] if args.tiny else ["resnet50", "gpt2-small"]):
        try:
            net, sets, per_tensor = harness.coupled_model(model, device)
        except ImportError as e:
            records.append(dict(coupled_model=model, skipped=f"ImportError: {e}"))
            print(f"coupled {model}: skipped ({e})", flush=True)
            save()
            continue
        tensors = list({id(_base(net, m.tensor)): _base(net, m.tensor)
                        for st in sets for m in st.slices}.values())
        copies = [torch.empty_like(t) for t in tensors]
        params = [t.param for t in per_tensor]
        dims = [t.dim for t in per_tensor]
        members = [m.tensor for st in sets for m in st.slices]
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        row = dict(coupled_model=model, dtype="fp32", groups=sum(st.num_groups for st in sets),
                   sets=len(sets), tensors=len(tensors), bytes=3 * nbytes(members),
                   per_tensor_bytes=2 * nbytes(params), floor_bytes=2 * nbytes(tensors))
        row["coupled_s"] = bench(lambda: fastprox.coupled_prox_(sets, lam_group=MODEL_LAM))
        row["per_tensor_s"] = bench(lambda: fastprox.foreach_prox_(params, lam_group=MODEL_LAM,
                                                                   dim=dims))
        row["per_tensor_gbps"] = row["per_tensor_bytes"] / row["per_tensor_s"] / 1e9
        row["floor_s"] = bench(lambda: torch._foreach_copy_(copies, tensors))
        records.append(row)
        save()
        print(harness.report("", "", [], [], [row]).splitlines()[-1], flush=True)
    return records


def bench_metric(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    """Group lasso in an Adam step's metric on every weight of ResNet-50 and GPT-2 small
    (foreach_metric_prox_, each weight with its second moment), against the Euclidean step
    (foreach_prox_), the float64 reference (float32 only) and the floor: one read of each weight
    and its moment and one write of the weight (``torch._foreach_add_``)."""
    import fastprox

    for model, dtype_name, shapes, weights in _model_lists(args, device, skip=("fp16",)):
        dtype = weights[0].dtype
        moments = [torch.rand(s, device=device).mul_(1e-4).to(dtype) for s, _ in shapes]
        dims = [[d] if isinstance(d, int) else list(d) for _, d in shapes]
        n = len(weights)
        lams = torch.tensor([(0.0, MODEL_LAM, 0.0)] * n, dtype=torch.float64)
        metric = torch.tensor([(1 / (1 - 0.999 ** 100), 1e-8, 1e-3)] * n,
                              dtype=torch.float64)
        flat, counts = [d for ds in dims for d in ds], [len(ds) for ds in dims]
        flags = [True] * n
        op = fastprox.metric.ops.foreach_metric_prox_
        row = dict(metric_model=f"{model} {dtype_name}", tensors=n,
                   bytes=3 * sum(w.numel() * w.element_size() for w in weights))
        row["metric_s"] = bench(lambda: op(weights, moments, lams, metric, flat, counts,
                                           flags, flags))
        row["euclidean_s"] = bench(lambda: fastprox.foreach_prox_(
            weights, lam_group=1e-3 * MODEL_LAM, dim=[tuple(d) for d in dims]))
        if dtype_name == "fp32":
            row["reference_s"] = bench(lambda: fastprox.reference.foreach_metric_prox_op(
                weights, moments, lams, metric, flat, counts, flags, flags))
        row["floor_s"] = bench(lambda: torch._foreach_add_(weights, moments, alpha=1e-30))
        records.append(row)
        save()
        print(harness.report("", "", [], metric=[row]).splitlines()[-1], flush=True)
    return records


def _syncs(fn) -> int:
    """The host synchronizations one call of ``fn`` makes on CUDA: the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (a copy to the host, ``.item()``, a stream
    synchronize)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_training(args, device, bench, records: list, save=lambda: None) -> list[dict]:
    """The regularizer's proximal step beside the AdamW step and the training step (forward,
    backward, AdamW) on the models of bench/test_bench_cpu.py's test_training_step (harness.
    step_model: GPT-2 and Llama with coupled heads and neurons, ResNet-50 with channels),
    float32: ``reg.prox_step(opt)`` in the AdamW metric and Euclidean, on the state of one
    AdamW step. The strength is the CPU benchmark's times ``GPU_SCALE``, so that the repeated
    calls of a timing loop leave the groups alive (every group takes the Newton steps). On CUDA,
    the host synchronizations of one step too (``metric_syncs``, ``euclidean_syncs``, and
    ``metric_syncs_capturable`` after a capturable AdamW's step, whose step counts are on the
    GPU). A model whose packages are missing is recorded as skipped, with the reason."""
    for model in (["gpt2-tiny"] if args.tiny else harness.STEP_MODELS):
        try:
            net, reg, loss_fn = harness.step_model(model, torch.Generator().manual_seed(0),
                                                   device, lam=1e-4 * GPU_SCALE)
        except ImportError as e:
            records.append(dict(step_model=model, skipped=f"ImportError: {e}"))
            print(f"training step {model}: skipped ({e})", flush=True)
            save()
            continue
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def train_with(optimizer):
            with torch.enable_grad():
                optimizer.zero_grad(set_to_none=False)
                loss_fn().backward()
                optimizer.step()

        def train():
            train_with(opt)

        train()  # the state the proximal step reads: one step taken
        row = dict(step_model=model, params=sum(p.numel() for p in params),
                   sets=len(reg.coupled))
        row["train_s"] = bench(train)
        row["adamw_s"] = bench(opt.step)
        row["metric_s"] = bench(lambda: reg.prox_step(opt, prox="metric"))
        row["euclidean_s"] = bench(lambda: reg.prox_step(opt, prox="euclidean"))
        if device == "cuda":  # the host synchronizations of one step
            row["metric_syncs"] = _syncs(lambda: reg.prox_step(opt, prox="metric"))
            row["euclidean_syncs"] = _syncs(lambda: reg.prox_step(opt, prox="euclidean"))
            captured = torch.optim.AdamW(params, lr=1e-3, capturable=True)  # steps on the GPU
            train_with(captured)
            row["metric_syncs_capturable"] = _syncs(lambda: reg.prox_step(captured,
                                                                          prox="metric"))
        records.append(row)
        save()
        print(harness.report("", "", [], steps=[row]).splitlines()[-1], flush=True)
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, wall clock, no compile")
    parser.add_argument("--ops", nargs="*", choices=list(harness.BY_LABEL))
    parser.add_argument("--shapes", nargs="*")
    parser.add_argument("--dtypes", nargs="*", default=list(harness.DTYPES),
                        choices=list(harness.DTYPES))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-models", action="store_true")
    parser.add_argument("--no-coupled", action="store_true")
    parser.add_argument("--no-metric", action="store_true")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--compile-ops", nargs="*", choices=list(harness.BY_LABEL),
                        help="compile the baseline for these operators only (default: all)")
    parser.add_argument("--compile-dtypes", nargs="*", choices=list(harness.DTYPES),
                        help="compile the baseline in these dtypes only (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "gpu-kernels.json"))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not INTERPRET
    if not cuda and not args.tiny:
        parser.error("needs a CUDA device (or --tiny under TRITON_INTERPRET=1)")
    device = "cuda" if cuda else "cpu"
    bench = _timer(args.tiny)
    machine = _machine()
    print(f"Machine: {machine['name']}")
    result = dict(machine=machine, ops=[], models=[], coupled=[], metric=[], training=[])

    def save():  # after every row: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    with torch.no_grad(), harness.served_by_kernels(not cuda):
        bench_ops(args, device, bench, result["ops"], save)
        if not args.no_training:  # the product's path first: a run cut short keeps it
            bench_training(args, device, bench, result["training"], save)
        if not args.no_models:
            bench_models(args, device, bench, result["models"], save)
        if not args.no_metric:
            bench_metric(args, device, bench, result["metric"], save)
        if not args.no_coupled:
            bench_coupled(args, device, bench, result["coupled"], save)
    save()
    print(harness.report(machine["name"], "device-to-device copy", result["ops"],
                         result["models"], [r for r in result["coupled"] if "coupled_s" in r],
                         result["metric"], [r for r in result["training"] if "train_s" in r]))
    print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()
