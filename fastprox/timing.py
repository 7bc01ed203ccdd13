"""python -m fastprox.timing: apply every operator to a large random weight and report what it does.

For each operator and group layout (rows, columns): groups kept, nonzero weights, time, memory
throughput (one read + one write of the weight), the speed ratio to the pure-PyTorch reference,
and the largest difference from the reference's result.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import fastprox
from fastprox import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _median_seconds(fn, source: torch.Tensor, repeat: int) -> tuple[float, torch.Tensor]:
    work = source.clone()
    times = []
    for _ in range(repeat):
        work.copy_(source)
        start = time.perf_counter()
        fn(work)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], work


def _cases(lam: float):
    # (label, fused, reference, dim): thresholds chosen to remove a visible share of the groups of
    # an N(0, 1) weight.
    return [
        ("group_shrink_", lambda w, d: fastprox.group_shrink_(w, lam, d),
         lambda w, d: reference.group_shrink_(w, lam, d)),
        ("soft_threshold_", lambda w, d: fastprox.soft_threshold_(w, 0.5),
         lambda w, d: reference.soft_threshold_(w, 0.5)),
        ("sparse_group_shrink_", lambda w, d: fastprox.sparse_group_shrink_(w, 0.1, lam, d),
         lambda w, d: reference.sparse_group_shrink_(w, 0.1, lam, d)),
        ("exclusive_shrink_", lambda w, d: fastprox.exclusive_shrink_(w, 1e-3, d),
         lambda w, d: reference.exclusive_shrink_(w, 1e-3, d)),
        ("cges_shrink_", lambda w, d: fastprox.cges_shrink_(w, lam, 1e-3, d),
         lambda w, d: reference.cges_shrink_(w, lam, 1e-3, d)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastprox.timing", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--lam", type=float, default=1.0,
                        help="group lasso lam (the threshold is lam * sqrt(group size))")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    # Unit groups of different strengths, so that a threshold keeps some and removes others.
    out, inn = args.shape
    weight = (torch.randn(out, inn) * torch.rand(out, 1) * torch.rand(1, inn) * 2).to(dtype)
    nbytes = 2 * weight.numel() * weight.element_size()
    print(f"fastprox {fastprox.__version__} | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads | "
          f"weight {out}x{inn} {args.dtype} ({weight.numel() * weight.element_size() / 2**20:.0f} MiB)")
    floor, _ = _median_seconds(lambda w: w.mul_(0.999), weight, args.repeat)
    print(f"one-pass floor (in-place mul_): {floor * 1e3:.2f} ms, {nbytes / floor / 1e9:.1f} GB/s\n")
    header = (f"{'operator':21} {'groups':7} {'kept':>13} {'nonzero':>8} {'ms':>8} {'GB/s':>6} "
              f"{'x floor':>7} {'vs ref':>7} {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for name, fused, ref in _cases(args.lam):
        for label, dim in [("rows", 1), ("columns", 0)]:
            t_fused, result = _median_seconds(lambda w: fused(w, dim), weight, args.repeat)
            t_ref, expected = _median_seconds(lambda w: ref(w, dim), weight, max(1, args.repeat // 2))
            norms = fastprox.group_norms(result, dim)
            kept = int((norms > 0).sum())
            nonzero = (result != 0).float().mean().item()
            diff = (result.double() - expected.double()).abs().max().item()
            print(f"{name:21} {label:7} {kept:>6}/{norms.numel():<6} {nonzero:>8.1%} "
                  f"{t_fused * 1e3:>8.2f} {nbytes / t_fused / 1e9:>6.1f} {t_fused / floor:>7.2f} "
                  f"{t_ref / t_fused:>6.1f}x {diff:>10.2e}")


if __name__ == "__main__":
    main()
