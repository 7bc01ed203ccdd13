"""The communication benchmark (bench/comm_distributed.py) on tiny shapes: it runs, its
fastprox and naive steps agree, and it counts what the step communicates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "comm_distributed.py")


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_comm_benchmark_tiny(tmp_path):
    out = tmp_path / "comm.json"
    command = [sys.executable, BENCH, "--tiny", "--world", "2", "--repeats", "1", "--json",
               str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {(r["setting"], r["impl"]): r for r in result["rows"]}
    weights, params = result["weights"], result["params"]
    columns = 2 * 24 + 2 * (24 + 24 + 24 + 96)  # the tiny model's column groups
    for (setting, impl), r in rows.items():
        assert r["max_abs_difference"] <= 1e-6, (setting, r)
        if impl == "naive all-gather":
            # every weight gathered whole (uneven shards are padded to equal ones to gather)
            assert r["collectives"] == weights
            assert 4 * params <= r["result_bytes"] <= 4 * params * 1.01
    assert rows[("group lasso, rows (dim=1)", "fastprox")]["collectives"] == 0
    for setting, values in [("group lasso, columns (dim=0)", 1), ("sparse group lasso, columns", 1),
                            ("CGES (bound), columns", 2)]:
        assert rows[(setting, "fastprox")]["collectives"] == 1
        assert rows[(setting, "fastprox")]["result_bytes"] == 4 * values * columns
    exclusive = rows[("exclusive exact, columns", "fastprox")]
    assert exclusive["collectives"] >= 2
