"""The demo (python -m fastprox): its quick mode runs, its table has the promised structure, the
compacted models predict what the trained ones do, and proximal group lasso removes units."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fastprox import demo  # noqa: E402
from fastprox.demo import data, experiments, report  # noqa: E402

METHOD = {m.name: m for m in experiments.METHODS}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.main(["--quick", "--out", str(out)])
    return out, results


def test_quick_mode_runs_every_method_and_writes_its_files(quick_run):
    out, results = quick_run
    assert [r.method.name for r in results] == experiments.METHOD_NAMES
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved] == experiments.METHOD_NAMES
    for name in experiments.METHOD_NAMES:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "digits-pixels.png").stat().st_size > 0
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored


def test_table_structure(quick_run):
    out, results = quick_run
    text = (out / "results.md").read_text()
    assert text.startswith("fastprox demo (quick schedule, seed 0)")
    tables = {}
    for title in ("DIGITS, MLP 64-40-20-10", "diabetes regression, MLP 10-20-15-1",
                  "DIGITS 8x8 images, CNN (channels 1-16-32-64)"):
        assert f"**{title}**" in text
        section = text.split(f"**{title}**")[1].split("**")[0]
        rows = [line for line in section.splitlines() if line.startswith("|")]
        header, rule, *body = rows
        columns = header.count("|") - 1
        assert rule == "|" + "---|" * columns
        assert all(row.count("|") - 1 == columns for row in body)
        tables[title] = (header, body)
    header, body = tables["DIGITS, MLP 64-40-20-10"]
    assert "test acc." in header and "units alive (64-40-20)" in header
    assert len(body) == sum(m.task == "digits" for m in experiments.METHODS)
    header, body = tables["diabetes regression, MLP 10-20-15-1"]
    assert "R² (MSE)" in header and len(body) == 3
    for r in results:  # every run's row names its units, e.g. "| 64-40-20 |" or "| 4, 29 |"
        sep = ", " if r.kinds else "-"
        assert f"| {sep.join(str(k) for k, _ in r.units)} |" in text
    for task, title in report.COUPLED_TITLES.items():
        section = text.split(f"**{title}**")[1].split("**")[0]
        rows = [line for line in section.splitlines() if line.startswith("|")]
        header, rule, *body = rows
        assert "FLOPs compact / dense" in header and "CPU latency compact / dense" in header
        assert len(body) == sum(m.task == task for m in experiments.METHODS)


def test_compaction_preserves_predictions(quick_run):
    _, results = quick_run
    for r in results:
        assert r.same_predictions, r.method.name
        assert r.max_diff <= 1e-4, (r.method.name, r.max_diff)
        assert r.params[0] <= r.params[1] + (64 + 40 + 20 if r.method.update == "l0" else 0)


def test_units_are_counted_per_layer(quick_run):
    _, results = quick_run
    totals = {"digits": [64, 40, 20], "diabetes": [10, 20, 15], "cnn": [1, 16, 32, 64],
              "resnet": [48], "transformer": [8, 128]}
    by_name = {r.method.name: r for r in results}
    for r in results:
        if r.method.scratch_of:  # the widths its reference run kept, trained from scratch
            reference = by_name[r.method.scratch_of]
            assert [t for _, t in r.units] == [k for k, _ in reference.units]
            assert r.params[0] == reference.params[0]
            assert len(r.inits) == 3 and r.metric == sorted(r.inits)[1]
        else:
            assert [t for _, t in r.units] == totals[r.method.task]
        assert all(0 <= k <= t for k, t in r.units)
        assert r.history.steps[0] == 0 and r.history.steps[-1] == r.epochs


def test_coupled_tasks_measure_the_compacted_model(quick_run):
    _, results = quick_run
    coupled = [r for r in results if r.kinds]
    assert {r.method.task for r in coupled} == {"resnet", "transformer"}
    for r in coupled:
        assert r.flops[0] <= r.flops[1] and r.params[0] <= r.params[1]
        assert r.latency_ms[0] > 0 and r.latency_ms[1] > 0
        assert r.kinds == (("channels",) if r.method.task == "resnet" else ("heads", "neurons"))


def test_proximal_group_lasso_removes_units_on_digits():
    split = experiments.load("digits")
    r = experiments.run(METHOD["gl-prox"], split, epochs=60, progress=False)
    (inputs, n_in), (h1, n1), (h2, n2) = r.units
    assert inputs < n_in and h1 + h2 < n1 + n2
    assert r.zeros == "exact" and r.same_predictions
    assert r.params[0] < r.params[1]
    # pixels that are 0 in every training image get no data gradient: the prox must zero them
    constant = (split.x_train == 0).all(dim=0).nonzero().flatten().tolist()
    assert constant and not set(constant) & set(r.kept_inputs.tolist())
    assert r.metric > 0.85


def test_runs_are_deterministic():
    split = experiments.load("digits")
    runs = [experiments.run(METHOD[name], split, epochs=8, progress=False)
            for name in ("sgl-prox", "sgl-prox", "l0", "l0")]
    for a, b in (runs[:2], runs[2:]):
        assert (a.metric, a.units, a.weights_kept, a.max_diff) == \
            (b.metric, b.units, b.weights_kept, b.max_diff)
        assert a.history.units == b.history.units


def test_penalty_runs_are_pruned_with_the_seeds_criterion():
    model = experiments.digits_mlp()
    with torch.no_grad():
        model[0].weight[:, 3] = 4e-4           # every weight rounds to 0.000: dead
        model[0].weight[:, 5] = 4e-4
        model[0].weight[7, 5] = 6e-4           # one weight rounds to 0.001: alive
    experiments.prune_negligible_(model, "digits")
    assert (model[0].weight[:, 3] == 0).all()
    assert (model[0].weight[:, 5] != 0).all()
    regression = experiments.diabetes_mlp()
    with torch.no_grad():
        regression[0].weight[:, 2] = 1e-3 / 20 * 0.9   # sum |w| below 1e-3: dead
        regression[0].weight[:, 4] = 1e-3 / 20 * 1.5
    experiments.prune_negligible_(regression, "diabetes")
    assert (regression[0].weight[:, 2] == 0).all()
    assert (regression[0].weight[:, 4] != 0).all()


def test_bar_check():
    base = experiments.Result(METHOD["none"], 1, 0.0, "exact", 0.97, 0.97, None,
                              [(64, 64), (40, 40), (20, 20)], (1, 1), (1, 1), 0.0, True)
    good = dataclasses.replace(base, method=METHOD["gl-prox"], metric=0.961,
                               units=[(42, 64), (20, 40), (10, 20)])
    assert report.meets_bar(good, base)
    assert not report.meets_bar(dataclasses.replace(good, metric=0.959), base)
    assert not report.meets_bar(dataclasses.replace(good, units=[(43, 64), (20, 40), (10, 20)]),
                                base)
    assert not report.meets_bar(dataclasses.replace(good, units=[(42, 64), (21, 40), (10, 20)]),
                                base)


def test_validation_split_leaves_the_test_set_out():
    sk = data._sklearn()
    index = np.arange(1797)
    labels = sk.datasets.load_digits().target
    train, test, _, _ = data._split(sk, index, labels, 0, False, True)
    val_train, val_test, _, _ = data._split(sk, index, labels, 0, True, True)
    assert set(val_train) | set(val_test) == set(train)
    assert not set(val_test) & set(test) and not set(val_train) & set(test)
    assert len(val_test) == pytest.approx(0.25 * len(train), abs=1)


def test_command_line():
    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "nope"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--quick", "--full"])
    args = demo.parse_args(["--methods", "cnn,gl-prox,cnn-none"])
    assert args.method_names == ["cnn-none", "cnn-gl-prox", "cnn-cges", "gl-prox"]
    help_text = subprocess.run([sys.executable, "-m", "fastprox", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--full" in help_text and "gl-prox" in help_text
