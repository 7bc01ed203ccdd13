"""The benchmark harness (bench/harness.py): its cases are the operator table's, and each
baseline a user would write computes what the operator computes (on finite data), so that the
speed comparisons are between equal work."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import harness  # noqa: E402
from fastprox.operators import OPERATORS  # noqa: E402


def test_cases_are_the_table():
    assert {c.row.name for c in harness.CASES} == {
        r.name for r in OPERATORS if r.kind in ("norms", "preset")}
    assert all(c.row.bench for c in harness.CASES)


@pytest.mark.parametrize("dim", [1, 0, (1, 2)], ids=str)
@pytest.mark.parametrize("label", list(harness.BY_LABEL))
def test_baseline_computes_the_operator(label, dim):
    case = harness.BY_LABEL[label]
    scale = 1.0 if case.row.name == "group_norms" else 40.0  # thresholds fit small groups
    case = case.scaled(scale)
    w = torch.randn(12, 9, 5, dtype=torch.float64)
    w[3] = 0  # a zero group: the baselines need not be NaN-exact, but finite data must match
    mine, theirs = w.clone(), w.clone()
    got = case.fastprox()(mine, dim)
    want = case.eager()(theirs, dim)
    if case.row.kind == "norms":
        mine, theirs = got, want
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert case.row.kind == "norms" or not torch.equal(mine, w)  # the step did something


def test_model_steps_agree():
    dims = [0, (0, 2, 3), 1]
    ws = [torch.randn(8, 6, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64),
          torch.randn(5, 7, dtype=torch.float64)]
    steps = harness.model_steps(dims, 0.3)
    results = []
    for impl in ("foreach", "loop", "eager"):
        copies = [w.clone() for w in ws]
        steps[impl](copies)
        results.append(copies)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_target_study_runs_a_row_of_each_table():
    """bench/target_study.py (the README's target tables) on a few steps: each study's row
    trains and reports its pools."""
    import target_study

    pytest.importorskip("sklearn")
    digits = target_study.run_digits(kept=0.25, lam=1e-3, steps=6, by_step=3)
    assert digits["reached"] == {"units": 0.25} and len(digits["widths"]) == 3
    pytest.importorskip("transformers")
    row = target_study.run_transformer("llama", 1e-3, steps=4, by_step=2, layers=1)
    assert row["reached"] == {"heads": 0.5, "neurons": 0.5} and len(row["losses"]) == 4
    assert row["warnings"] == []
