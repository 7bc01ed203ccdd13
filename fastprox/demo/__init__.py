"""python -m fastprox: the seed experiments of structured-sparsity training, reproduced offline.

Trains small networks on data that ships with scikit-learn (DIGITS, diabetes) with every
method fastprox serves -- group lasso, sparse group lasso, L1, exclusive lasso, CGES, L0 gates,
and the unregularized and L2 baselines -- then reports, per run: test accuracy (R² and MSE for
regression), units alive per layer, weights kept, the size of the compacted model and whether
the compacted model predicts exactly what the trained one does. Writes a Markdown table, JSON
and one PNG per run (units alive over the epochs; the kept input pixels on DIGITS).
See ``fastprox.demo.experiments`` for the set-ups.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import torch

from .experiments import METHOD_NAMES, METHODS, SCHEDULES, TASKS, Result, run_all


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {cpu}, {torch.get_num_threads()} threads"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastprox", description=__doc__.splitlines()[0],
        epilog="methods: " + ", ".join(f"{m.name} ({m.task})" for m in METHODS))
    parser.add_argument("--full", action="store_true",
                        help="the papers' schedule: 1500 epochs on DIGITS (default: 300)")
    parser.add_argument("--quick", action="store_true",
                        help="a few epochs only: checks that everything runs (seconds)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names or tasks (digits, diabetes, cnn, resnet, "
                             "transformer); "
                             "default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-out"),
                        help="directory for results.md, results.json and the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on a validation split of the training set instead of the "
                             "test set (how the demo's strengths were chosen)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")
    names = []
    for item in args.methods.split(","):
        item = item.strip()
        if item == "all":
            names += METHOD_NAMES
        elif item in TASKS:
            names += [m.name for m in METHODS if m.task == item]
        elif item in METHOD_NAMES:
            names.append(item)
        else:
            parser.error(f"--methods: unknown method or task {item!r} (methods: "
                         f"{', '.join(METHOD_NAMES)}; tasks: {', '.join(TASKS)})")
    args.method_names = list(dict.fromkeys(names))
    return args


def main(argv=None) -> list[Result]:
    from . import report

    args = parse_args(argv)
    schedule = SCHEDULES["full" if args.full else "quick" if args.quick else "default"]
    mode = "full" if args.full else "quick" if args.quick else "default"
    header = (f"fastprox demo ({mode} schedule, seed {args.seed}"
              f"{', validation split' if args.validation else ''}) | torch {torch.__version__} "
              f"| device {args.device} | {_machine()}")
    print(header)
    start = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        # fixed seeds and deterministic kernels: on the CPU, two runs give the same table
        torch.use_deterministic_algorithms(True, warn_only=True)
        results = run_all(args.method_names, schedule, seed=args.seed, device=args.device,
                          validation=args.validation)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    elapsed = time.perf_counter() - start
    header += f" | {elapsed:.0f} s"
    written = report.write(results, args.out, header, plots=not args.no_plots)
    print()
    print(report.table(results))
    print(f"{len(results)} runs in {elapsed:.1f} s; table, JSON and figures in {args.out}/ "
          f"({len(written)} files)")
    if not all(r.same_predictions for r in results):
        print("a compacted model's predictions differ from its model's", file=sys.stderr)
    return results
