"""Markdown tables of a GPU benchmark run (bench/gpu_kernels.py's JSON), checked against the
targets kept in bench/RESULTS.md:

    python bench/gpu_report.py gpu-out/gpu-kernels.json

Targets (medians of one run): rows of >= 512 elements at >= 90 % of device-to-device copy
bandwidth; columns, conv input channels, rows < 512 and the exact exclusive prox at >= 80 %;
>= 1.3x the compiled eager baseline on rows longer than 1024, >= 2x on columns; the ResNet-50 and
GPT-2 lists in <= 4 launches and >= 5x faster than a Python loop of single calls; the
regularizer's proximal step in the AdamW metric at most the AdamW step and a tenth of the
training step.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


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
    case = harness.BY_LABEL[row["op"]]
    exact = case.row.newton(case.flags)
    if rows_layout and n >= 512 and not exact:
        return 0.9, 1.3 if n > 1024 else None
    return 0.8, 2.0 if dims == [0] and len(row["shape"]) == 2 else None


def report(result: dict) -> str:
    """The run in the harness's format (bench/harness.py), then each target met or missed."""
    m = result["machine"]
    coupled = result.get("coupled", [])
    training = result.get("training", [])
    lines = [harness.report(m.get("name", m.get("gpu")), "device-to-device copy", result["ops"],
                            result["models"], [r for r in coupled if "coupled_s" in r],
                            result.get("metric", []), [r for r in training if "train_s" in r]),
             *[f"Coupled {r['coupled_model']}: skipped ({r['skipped']})." for r in coupled
               if "skipped" in r],
             *[f"Training step {r['step_model']}: skipped ({r['skipped']})." for r in training
               if "skipped" in r], "",
             "| operator | weight | dtype | of copy | vs compiled | target |",
             "|---|---|---|---|---|---|"]
    met = missed = 0
    for r in result["ops"]:
        frac, speed = op_target(r)
        of_copy = 1 / r["x_floor"]
        verdicts = []
        if frac is not None:
            ok = of_copy >= frac
            verdicts.append(f"{frac:.0%} of copy {'met' if ok else '**missed**'}")
            met, missed = met + ok, missed + (not ok)
        if speed is not None and "vs_compiled" in r:
            ok = r["vs_compiled"] >= speed
            verdicts.append(f"{speed}x compiled {'met' if ok else '**missed**'}")
            met, missed = met + ok, missed + (not ok)
        compiled = f"{r['vs_compiled']:.2f}x" if "vs_compiled" in r else "-"
        lines.append(f"| {r['op']} | {r['weight']} | {r['dtype']} | {of_copy:.0%} | {compiled} | "
                     f"{'; '.join(verdicts) or '-'} |")
    lines += ["", "| model | dtype | launches | loop / foreach | target |", "|---|---|---|---|---|"]
    for r in result["models"]:
        loop = r["loop_s"] / r["foreach_s"]
        ok = r["launches"] <= 4 and loop >= 5
        met, missed = met + ok, missed + (not ok)
        lines.append(f"| {r['model']} | {r['dtype']} | {r['launches']} | {loop:.1f}x | "
                     f"<= 4 launches, >= 5x: {'met' if ok else '**missed**'} |")
    steps = [r for r in training if "train_s" in r]
    if steps:
        lines += ["", "| model | metric prox / AdamW | / train step | target |",
                  "|---|---|---|---|"]
    for r in steps:
        adam, train = r["metric_s"] / r["adamw_s"], r["metric_s"] / r["train_s"]
        ok = adam <= 1.0 and train <= 0.1
        met, missed = met + ok, missed + (not ok)
        lines.append(f"| {r['step_model']} | {adam:.2f} | {train:.3f} | <= 1.0x AdamW, "
                     f"<= 0.1x train: {'met' if ok else '**missed**'} |")
    synced = [r for r in steps if "metric_syncs" in r]
    if synced:
        lines += ["", "| model | host syncs: metric step | capturable AdamW | euclidean step | "
                  "target |", "|---|---|---|---|---|"]
    for r in synced:
        counts = (r["metric_syncs"], r.get("metric_syncs_capturable", 0), r["euclidean_syncs"])
        ok = max(counts) <= 1
        met, missed = met + ok, missed + (not ok)
        lines.append(f"| {r['step_model']} | {counts[0]} | {r.get('metric_syncs_capturable', '-')}"
                     f" | {counts[2]} | <= 1 a step: {'met' if ok else '**missed**'} |")
    lines += ["", f"Targets met: {met}, missed: {missed}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        print(report(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
