"""Prints (and writes to bench/last-run-cpu.md) a side-by-side summary of each benchmark group:
median time, GB/s, ratio to the one-pass floor, and fastprox's speed-up over the references."""

from __future__ import annotations

import os

import torch
from machine import cpu_name


def _machine() -> str:
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, object]] = {}
    models: dict[str, dict[str, object]] = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "model" in info:
            models.setdefault(bench.group, {})[info["impl"]] = bench
        elif "impl" in info:
            groups.setdefault(bench.group, {})[info["impl"]] = bench
    lines = [f"Machine: {_machine()}", "",
             "| operator | weight | dtype | fastprox ms | GB/s | x floor | floor GB/s | "
             "ref ms | compiled ms | vs ref | vs compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, impls in groups.items():
        if "fastprox" not in impls:
            continue
        fused = impls["fastprox"]
        info = fused.extra_info
        t = fused.stats.median
        median = lambda impl: impls[impl].stats.median if impl in impls else float("nan")  # noqa
        floor = median("floor")
        floor_bytes = impls["floor"].extra_info["bytes"] if "floor" in impls else float("nan")
        lines.append(
            f"| {info['op']} | {info['shape']} | {info['dtype']} | {t * 1e3:.2f} | "
            f"{info['bytes'] / t / 1e9:.1f} | {t / floor:.2f} | {floor_bytes / floor / 1e9:.1f} | "
            f"{median('reference') * 1e3:.1f} | {median('compiled') * 1e3:.1f} | "
            f"{median('reference') / t:.1f}x | {median('compiled') / t:.1f}x |")
    if models:
        lines += ["", "Whole-model step (group lasso on every weight):", "",
                  "| model | dtype | tensors | foreach ms | GB/s | x floor | loop ms | loop / foreach "
                  "| reference ms | reference / foreach |", "|---|---|---|---|---|---|---|---|---|---|"]
        for impls in models.values():
            if "foreach" not in impls:
                continue
            info = impls["foreach"].extra_info
            t = impls["foreach"].stats.median
            med = lambda impl: impls[impl].stats.median if impl in impls else float("nan")  # noqa
            lines.append(
                f"| {info['model']} | {info['dtype']} | {info['tensors']} | {t * 1e3:.2f} | "
                f"{info['bytes'] / t / 1e9:.1f} | {t / med('floor'):.2f} | {med('loop') * 1e3:.2f} | "
                f"{med('loop') / t:.2f}x | {med('reference') * 1e3:.1f} | {med('reference') / t:.1f}x |")
    text = "\n".join(lines) + "\n"
    terminalreporter.write_sep("=", "fastprox CPU summary")
    terminalreporter.write(text)
    with open(os.path.join(os.path.dirname(__file__), "last-run-cpu.md"), "w") as f:
        f.write(text)
