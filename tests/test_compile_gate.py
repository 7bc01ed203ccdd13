"""The compile gate (bench/compile_gate.py): its specializations are the launcher's, its checks
catch what they are meant to catch, and a sample of the catalog compiles clean. The whole
catalog, with the newest Triton and with 3.6.0, is `make compile-gate` (.ci/run runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compile_gate as gate  # noqa: E402

from fastprox.kernels import metric_prox, tiles  # noqa: E402
from fastprox.kernels.tables import Tables  # noqa: E402

CASES = [((64, 300), [1]), ((300, 64), [0]), ((64, 32, 3, 3), [0, 2, 3]), ((4096, 64), [0]),
         ((3, 20000), [1]), ((33, 17), [1]), ((128, 5, 5), [0, 2])]


def _specs(weights, step, cap=90, sms=132):
    lists = gate.plans([(w, d) for w, d in weights], [step], sms)
    return [s for lau in lists for s in gate.specs_of(lau, cap)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("step", ["group", "sgl", "cges", "all-bound"])
def test_meta_plans_are_the_plans_of_real_tensors(dtype, step):
    """The gate plans meta tensors; real (CPU) tensors of the same shapes give the same
    specializations: alignment, tiles, paths and warps come from shapes, dtypes and addresses
    alone."""
    real = [(torch.randn(s).to(dtype), d) for s, d in CASES]
    meta = [(torch.empty(s, dtype=dtype, device="meta"), d) for s, d in CASES]
    assert _specs(real, step) == _specs(meta, step)


def _coupled_catalog():
    found = set()
    for dtype in gate.DTYPES.values():
        for launches in gate.coupled_plans(dtype, gate.STEPS).values():
            found |= {s for lau in launches for s in gate.specs_of(lau, 90)}
    return found


@pytest.mark.parametrize("direct", [False, True], ids=["adam", "direct"])
def test_coupled_launches_of_real_sets_are_in_the_catalog(monkeypatch, direct):
    """The coupled metric step on real (CPU) sets of every dtype, mixed dtypes and float64 sums
    included, launches only specializations the gate compiles (its constexprs come from dtypes
    and steps alone, never from the sets' layouts)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from coupled_metric_cases import random_set
    from fastprox.kernels import coupled_metric, launch

    seen = []
    monkeypatch.setattr(launch.Launch, "run", lambda self, config: seen.append(self))
    for dtype in gate.DTYPES.values():
        for lams in [(0.0, 0.3, 0.0), (0.01, 0.3, 0.0), (0.0, 0.2, 0.05), (0.01, 0.0, 0.05)]:
            groups, members, ds = random_set(dtype)
            if dtype == torch.float32 and direct:
                ds = [d * 1e19 for d in ds]  # float64 sums
            if lams[0] > 0:
                ds = [d.double() for d in ds]  # float64 moments (or metrics)
            members[1].data = members[1].data.to(torch.bfloat16)  # a set of mixed dtypes
            slices, starts = coupled_metric_prox_args(groups)
            coupled_metric.coupled_metric_prox_(
                members, ds, [m.axis for m in groups.slices],
                torch.tensor([(1.0, 0.0, 1.0)] * len(members), dtype=torch.float64),
                [len(members)], [slices], [starts],
                [lams[1] * groups.sizes.double().sqrt()], [lams[0]], [lams[2]], [True], direct)
    assert seen
    catalog = _coupled_catalog()
    for lau in seen:
        for spec in gate.specs_of(lau, 90):
            assert spec in catalog, dict(spec.constexprs)


def coupled_metric_prox_args(groups):
    from fastprox.metric import _slice_table
    return _slice_table(groups)


def test_unaligned_view_gets_element_accesses():
    base = torch.randn(65 * 64)
    aligned = [(base[:64 * 64].view(64, 64), [1])]
    shifted = [(base[1:1 + 64 * 64].view(64, 64), [1])]
    vec = {dict(s.constexprs)["VEC"] for s in _specs(aligned, "group")
           if s.kernel == "prox_kernel"}
    assert vec == {4}
    vec = {dict(s.constexprs)["VEC"] for s in _specs(shifted, "group")
           if s.kernel == "prox_kernel"}
    assert vec == {1}


def test_metric_moments_set_the_access_width():
    """The metric step's 16-byte accesses need the moment aligned too, and of the weight's
    dtype: a moment one element off, or of another dtype, gives element-wise accesses."""
    tables = Tables(torch.device("cpu"), upload=False)
    table = torch.zeros(1, 3, dtype=torch.float64)

    def vec(weight, moment):
        plans = metric_prox.plan_metric_step([(weight, moment, [1], True, True)],
                                             [(False, True, False)], table, table, 132, tables)
        return {lau.constexprs["VEC"] for _, _, launches, _ in plans for lau in launches}

    w = torch.randn(64, 64)
    flat = torch.zeros(65 * 64)
    assert vec(w, flat[:64 * 64].view(64, 64)) == {4}
    assert vec(w, flat[1:1 + 64 * 64].view(64, 64)) == {1}
    assert vec(w, torch.zeros(64, 64, dtype=torch.float64)) == {1}
    assert vec(w, torch.zeros(64, 64).t()) == {4}  # laid out like the weight by a copy


def test_warp_candidates_bound_elements_per_thread():
    for elems in (64, 512, 4096, 16384):
        for wide in (False, True):
            for per in (8, 16, 32):
                configs = tiles.warp_configs([(elems, per)], wide, 2)
                assert 1 <= len(configs) <= 2
                for c in configs:
                    w = c["num_warps"]
                    assert w <= tiles.MAX_WARPS[wide]
                    assert elems <= per * 32 * w or w == tiles.MAX_WARPS[wide]


def test_problems_catch_spills_errors_and_narrow_accesses():
    row = dict(vec=4, spill=0, frame=0, load_bits=[128], store_bits=[128])
    assert gate.problems(row) == []
    assert gate.problems(dict(row, spill=8, frame=16))[0].startswith("spills: 8 B")
    assert "32" in gate.problems(dict(row, load_bits=[32, 128]))[0]
    assert gate.problems(dict(row, vec=1, load_bits=[32], store_bits=[32])) == []
    assert gate.problems(dict(row, error="NameError: x"))[0].startswith("compile error")


def test_widths_read_from_ptx():
    ptx = ("@%p1 ld.global.cg.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
           "ld.global.b64 %rd4, [%rd3];\n"                 # a table load: not a weight
           "@%p2 st.global.v2.b32 [ %rd5 + 0 ], { %r5, %r6 };\n"
           "@%p3 ld.global.cg.b16 %rs1, [ %rd6 + 0 ];\n")
    assert gate._widths(ptx, gate._LD) == [16, 128]
    assert gate._widths(ptx, gate._ST) == [64]


def test_quick_gate_compiles_clean(tmp_path):
    """A sample of the catalog through Triton's compiler for sm_90a and sm_80: no compile
    error, no spill, 16-byte accesses wherever the host declared alignment."""
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_gate.py"),
                           "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["failures"] == 0 and summary["spilling"] == 0
    assert summary["specializations"] >= 50
    assert {r["arch"] for r in result["rows"]} == {"sm_90a", "sm_80"}
    assert {r["kernel"] for r in result["rows"]} == {
        "prox_kernel", "split_stats_kernel", "split_apply_kernel", "soft_threshold_kernel",
        "phase_kernel", "metric_kernel", "coupled_metric_kernel"}
    assert {r["steps"] for r in result["rows"] if r["kernel"] == "phase_kernel"} == {
        "sums", "above", "rewrite"}
    assert summary["aligned"] > 0 and summary["aligned_128"] == summary["aligned"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_without_cuda_says_so_and_stops(tmp_path):
    out = tmp_path / "gpu-out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out)],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
