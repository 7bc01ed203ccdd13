"""Prints (and writes to bench/last-run-cpu.md) the summary of a CPU benchmark run in the
harness's report format (bench/harness.py)."""

from __future__ import annotations

import os
import sys

# The repository root holds kernels/ (installed as fastprox.kernels): off sys.path, where it would
# pass for the Hugging Face `kernels` package that transformers probes when it is imported.
# fastprox is imported first, from wherever it is installed (an install that found it through the
# root keeps working).
import fastprox  # noqa: E402,F401

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

import harness  # noqa: E402


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    ops: dict[str, dict] = {}
    models: dict[str, dict] = {}
    coupled: dict[str, dict] = {}
    metric: dict[str, dict] = {}
    steps: dict[str, dict] = {}
    compiled: dict[str, dict] = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if not bench.stats.data:  # failed before it was timed
            continue
        into = compiled if "compiled_model" in info else coupled if "coupled_model" in info else metric if "metric_model" in info else \
            steps if "step_model" in info else models if "model" in info else ops
        row = into.setdefault(bench.group, {k: v for k, v in info.items()
                                            if k not in ("impl", "bytes")})
        row[f"{info['impl']}_s"] = bench.stats.median
        if info["impl"] == "floor":
            row["floor_bytes"] = info["bytes"]
        elif info["impl"] in ("fastprox", "foreach", "coupled", "metric"):
            row["bytes"] = info["bytes"]
        elif info["impl"] == "per_tensor":
            row["per_tensor_gbps"] = info["bytes"] / bench.stats.median / 1e9
    rows = [harness.derive(r) for r in ops.values() if "fastprox_s" in r]
    text = harness.report(harness.cpu_machine(), "in-place mul_ of the weight", rows,
                          [m for m in models.values() if "foreach_s" in m and "floor_s" in m],
                          [c for c in coupled.values() if "coupled_s" in c and "floor_s" in c],
                          [m for m in metric.values() if "metric_s" in m and "floor_s" in m],
                          [s for s in steps.values() if "adamw_s" in s and "metric_s" in s])
    text += harness.compiled_report(list(compiled.values()))
    terminalreporter.write_sep("=", "fastprox CPU summary")
    terminalreporter.write(text)
    with open(os.path.join(os.path.dirname(__file__), "last-run-cpu.md"), "w") as f:
        f.write(text)
