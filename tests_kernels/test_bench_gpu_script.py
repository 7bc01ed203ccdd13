"""bench/gpu_kernels.py stays runnable: its --tiny mode, on whatever runs the kernels here."""

from __future__ import annotations

import importlib.util
import math
import os

import harness

HERE = os.path.dirname(__file__)


def test_bench_script_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gpu_kernels", os.path.join(HERE, "..", "bench", "gpu_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--dtypes", "fp32", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists()
    assert {r["op"] for r in result["ops"]} == set(harness.BY_LABEL)
    for r in result["ops"]:
        for impl in ("fastprox", "eager", "floor"):
            assert math.isfinite(r[f"{impl}_s"]) and r[f"{impl}_s"] > 0
    assert [m["model"] for m in result["models"]] == ["resnet50", "gpt2-small"]
    for m in result["models"]:
        assert 1 <= m["launches"] <= 4
    # the coupled step on a small ResNet, or the reason it could not run
    [c] = result["coupled"]
    assert c["coupled_model"] == "resnet-tiny"
    if "skipped" in c:
        assert "torch_pruning" in c["skipped"]
    else:
        assert math.isfinite(c["coupled_s"]) and c["coupled_s"] > 0 and c["groups"] > 0
    coupled_lines = 2 if "coupled_s" in c else 0  # its header and its row
    # the metric step on both models' lists, against the Euclidean step, the reference, floor
    assert [r["metric_model"] for r in result["metric"]] == ["resnet50 fp32", "gpt2-small fp32"]
    for r in result["metric"]:
        for impl in ("metric", "euclidean", "reference", "floor"):
            assert math.isfinite(r[f"{impl}_s"]) and r[f"{impl}_s"] > 0
    metric_lines = 1 + len(result["metric"])  # its header and rows ("|---" is not counted)
    # the report of bench/gpu_report.py (gpu_check.sh's summary) reads the same JSON
    spec = importlib.util.spec_from_file_location(
        "gpu_report", os.path.join(HERE, "..", "bench", "gpu_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    # the regularizer's step beside AdamW and the training step, on a tiny GPT-2
    [t] = result["training"]
    assert t["step_model"] == "gpt2-tiny"
    if "skipped" in t:
        assert "transformers" in t["skipped"]
    else:
        for impl in ("train", "adamw", "metric", "euclidean"):
            assert math.isfinite(t[f"{impl}_s"]) and t[f"{impl}_s"] > 0
        assert t["sets"] == 2 and t["params"] > 0
    training_lines = 2 * 2 if "train_s" in t else 0  # a header and a row in two tables
    text = report.report(result)
    bare = report.report(dict(result, coupled=[], training=[]))
    assert text.count("\n| ") == bare.count("\n| ") + coupled_lines + training_lines
    assert bare.count("\n| ") == \
        2 * (len(result["ops"]) + len(result["models"]) + 2) + metric_lines
    assert ("| resnet-tiny |" in text) == ("coupled_s" in c)
    assert "Targets met:" in text
