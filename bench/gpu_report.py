"""Markdown tables of a GPU benchmark run (bench/gpu_kernels.py's JSON), checked against the
targets kept in bench/RESULTS.md:

    python bench/gpu_report.py gpu-out/gpu-kernels.json

Targets (medians of one run): rows of >= 512 elements at >= 90 % of device-to-device copy
bandwidth; columns, conv input channels, rows < 512 and the exact exclusive prox at >= 80 %;
>= 1.3x the compiled reference on rows longer than 1024, >= 2x on columns; the ResNet-50 and
GPT-2 lists in <= 4 launches and >= 5x faster than a Python loop of single calls.
"""

from __future__ import annotations

import json
import math
import sys


def _group_len(row) -> int:
    shape, dim = row["shape"], row["dim"]
    dims = [dim] if isinstance(dim, int) else dim
    return math.prod(shape[d] for d in dims)


def op_target(row) -> tuple[float | None, float | None]:
    """(fraction of copy bandwidth, speed-up over the compiled reference) asked of a row."""
    dims = [row["dim"]] if isinstance(row["dim"], int) else row["dim"]
    rows_layout = dims == [len(row["shape"]) - 1]
    n = _group_len(row)
    if row["op"] in ("soft_threshold_", "group_norms"):
        return None, None
    exact = row["op"] in ("exclusive_shrink_", "cges_shrink_")
    if rows_layout and n >= 512 and not exact:
        return 0.9, 1.3 if n > 1024 else None
    return 0.8, 2.0 if dims == [0] and len(row["shape"]) == 2 else None


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m.get('gpu')} ({m.get('sms')} SMs), torch {m['torch']}, "
             f"triton {m['triton']}", "",
             "| operator | weight | dtype | ms | GB/s | of copy | vs eager | vs compiled | "
             "target |", "|---|---|---|---|---|---|---|---|---|"]
    met = missed = 0
    for r in result["ops"]:
        frac, speed = op_target(r)
        verdicts = []
        if frac is not None:
            ok = r["of_copy"] >= frac
            verdicts.append(f"{frac:.0%} of copy {'met' if ok else '**missed**'}")
            met, missed = met + ok, missed + (not ok)
        if speed is not None and "vs_compiled" in r:
            ok = r["vs_compiled"] >= speed
            verdicts.append(f"{speed}x compiled {'met' if ok else '**missed**'}")
            met, missed = met + ok, missed + (not ok)
        get = lambda k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} dim={r['dim']} | "
                     f"{r['dtype']} | {r['fastprox_ms']:.3f} | {r['fastprox_gbps']:.0f} | "
                     f"{r['of_copy']:.0%} | {get('vs_reference', '{:.1f}x')} | "
                     f"{get('vs_compiled', '{:.2f}x')} | {'; '.join(verdicts) or '-'} |")
    lines += ["", "| model | dtype | tensors | launches | foreach ms | of copy | loop / foreach | "
                  "target |", "|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        ok = r["launches"] <= 4 and r["loop_over_foreach"] >= 5
        met, missed = met + ok, missed + (not ok)
        lines.append(f"| {r['model']} | {r['dtype']} | {r['tensors']} | {r['launches']} | "
                     f"{r['foreach_ms']:.3f} | {r['of_copy']:.0%} | "
                     f"{r['loop_over_foreach']:.1f}x | <= 4 launches, >= 5x: "
                     f"{'met' if ok else '**missed**'} |")
    lines += ["", f"Targets met: {met}, missed: {missed}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        print(report(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
