"""Proximal steps under torch.distributed on the CPU (gloo): sharded DTensors equal the unsharded
operator, one all_reduce per bucket, DDP replicas stay bit-identical, FSDP2 trains as one process.

Each world size runs in a pool of worker processes started once (tests/dist_pool.py); what the
ranks run is in tests/dist_workers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dist_workers as W
import fastprox
import helpers
from dist_pool import WorkerPool

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

_POOLS: dict[int, WorkerPool] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_pools():
    yield
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def pool(world: int) -> WorkerPool:
    if world not in _POOLS or _POOLS[world].broken:
        _POOLS[world] = WorkerPool(world)
    return _POOLS[world]


def one_result(results: list):
    """Every rank's full result must be the same; returns rank 0's."""
    first = results[0]
    for other in results[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(first),
                        torch.utils._pytree.tree_leaves(other)):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                                   b.view(torch.uint8) if b.dtype != torch.bool else b)
    return first


def assert_close_to_unsharded(got: torch.Tensor, full: torch.Tensor, unsharded: torch.Tensor,
                              want64: torch.Tensor, msg: str) -> None:
    """The sharded result against the unsharded kernel (partial sums add in another order: a
    few ulps of the accumulation type, one rounding of the storage type) and the float64
    reference (the kernel tests' tolerances)."""
    scale = max(want64.abs().nan_to_num(posinf=0).max().item() if want64.numel() else 1.0, 1.0)
    tol = helpers.TOLERANCES[full.dtype]
    torch.testing.assert_close(got.double(), want64, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=True, msg=lambda m: f"{msg} vs reference: {m}")
    ulp = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3,
           torch.float64: 1e-12}[full.dtype]
    torch.testing.assert_close(got.double(), unsharded.double(), rtol=ulp, atol=ulp * scale,
                               equal_nan=True, msg=lambda m: f"{msg} vs unsharded: {m}")


def reduces(placement: tuple, dims: list[int]) -> bool:
    return any(p.startswith("S") and int(p[1:]) in dims for p in placement)


# (shape, placements, dim): groups within shards and across them, uneven shards, an empty
# shard (2 rows on 3 ranks), conv weights.
LAYOUTS = [
    ((7, 5), ("S0",), 1),            # FSDP2 rows: within shards
    ((7, 5), ("S0",), 0),            # FSDP2 columns: across shards
    ((5, 7), ("S1",), 1),            # Shard(1), rows: across shards
    ((5, 7), ("S1",), 0),            # Shard(1), columns: within shards
    ((2, 6), ("S0",), 0),            # fewer rows than ranks
    ((5, 4, 3, 3), ("S0",), (0, 2, 3)),  # conv input channels, Shard(0): across
    ((5, 4, 3, 3), ("S0",), None),       # conv filters: within
    ((4, 5, 3, 3), ("S1",), 0),          # CGES positions, Shard(1): within
    ((6, 5), ("R",), 0),                 # replicated
]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op_index", range(len(helpers.OPS)),
                         ids=[str(op) for op in helpers.OPS])
def test_sharded_equals_unsharded(world, dtype, op_index):
    op = helpers.OPS[op_index]
    p = pool(world)
    for shape, spec, dim in LAYOUTS:
        if not op.grouped and dim not in (None, 1):
            continue
        full = helpers.random_weight(shape, dtype)
        got, records = one_result(p.run(W.run_op, op_index, full, spec, dim, None))
        unsharded = helpers.run(op, full.clone(), None, dim)
        want = helpers.expected(op, full, None, dim)
        msg = f"{op} {shape} {spec} dim={dim} world={world}"
        assert_close_to_unsharded(got, full, unsharded, want, msg)
        dims = fastprox._checks.normalize_dim(dim, full, "test")
        if not op.grouped or not reduces(spec, dims):
            assert records == [], f"{msg}: groups within shards need no communication"
        else:
            exact_newton = "exclusive" in op.name or "cges" in op.name
            exact_newton = exact_newton and op.kwargs.get("exact", True)
            assert len(records) == 1 or (exact_newton and 1 < len(records) <= 65), (msg, records)
            assert all(name == "c10d.allreduce_.default" for name, _ in records)


@pytest.mark.parametrize("world", [2, 3])
def test_edge_cases_across_shards(world):
    """Zero, NaN and inf groups, lam = 0 (bit-identical, no collective) and lam huge, on groups
    that span shards."""
    p = pool(world)
    full = helpers.random_weight((6, 5), torch.float32)
    full[:, 1] = 0
    full[2, 2] = math.nan
    full[4, 3] = math.inf
    for op_index, op in enumerate(helpers.OPS):
        if not op.grouped:
            continue
        for lams in (tuple(0.0 for _ in op.lams), tuple(1e30 for _ in op.lams), None):
            got, records = one_result(p.run(W.run_op, op_index, full, ("S0",), 0, lams))
            want = helpers.expected(op, full, lams, 0)
            msg = f"{op} lams={lams}"
            assert_close_to_unsharded(got, full, helpers.run(op, full.clone(), lams, 0), want,
                                      msg)
            assert not got[:, 1].isnan().any() and not got[:, 1].any(), f"{msg}: zero group"
            if lams is not None and lams[0] == 0:
                assert torch.equal(got.view(torch.int32), full.view(torch.int32)), msg
                assert records == [], f"{msg}: lam = 0 needs no communication"
            else:
                assert got[:, 2].isnan().all(), f"{msg}: NaN group"


def test_one_all_reduce_per_bucket():
    """Many tensors with groups across shards: one all_reduce whose buffer holds one float32
    per group (group lasso); tensors with groups within shards add nothing."""
    p = pool(3)
    shapes = [(7, 5), (9, 4), (3, 11), (13, 6)]
    fulls = [torch.randn(s) for s in shapes] + [torch.randn(8, 3)]
    specs = [("S0",)] * 4 + [("S0",)]
    dims = [0, 0, 0, 0, 1]  # the last: rows, within shards
    kwargs = dict(lam_group=0.2)
    got, records, _ = one_result(p.run(W.foreach, fulls, specs, dims, kwargs))
    want = fastprox.foreach_prox_([f.clone() for f in fulls], dim=dims, **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    assert records == [("c10d.allreduce_.default", 4 * sum(s[1] for s in shapes))]
    # bf16 and float32 weights share a float32 bucket; lam 0 and the L1-only step add nothing
    fulls = [torch.randn(7, 5, dtype=torch.bfloat16), torch.randn(9, 4), torch.randn(5, 5)]
    got, records, _ = one_result(p.run(W.foreach, fulls, [("S0",)] * 3, 0,
                                    dict(lam_group=[0.3, 0.1, 0.0], lam_l1=[0.1, 0.0, 0.2])))
    assert records == [("c10d.allreduce_.default", 4 * (5 + 4))]


def test_exact_exclusive_newton_steps():
    """Exact exclusive prox across shards: one all_reduce of (sum, count) per Newton step, as
    many steps as the unsharded iteration needs; bounded, with a warning and an under-shrink."""
    p = pool(2)
    full = torch.randn(64, 6).abs() ** 3 * torch.randn(64, 6).sign()
    kwargs = dict(lam_exclusive=2.0)
    (got,), records, caught = one_result(p.run(W.foreach, [full], [("S0",)], 0, kwargs))
    assert caught == []
    want = fastprox.exclusive_shrink_(full.clone(), 2.0, 0)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert records[0] == ("c10d.allreduce_.default", 4 * 2 * 6)  # sum of |w| and nonzeros
    assert all(r == ("c10d.allreduce_.default", 4 * 2 * 6) for r in records[1:])
    steps = len(records) - 1
    assert 2 <= steps <= 16, records
    # stopped early: tau is a lower bound, so magnitudes are never below the exact result's
    (early,), records, caught = one_result(p.run(W.foreach, [full], [("S0",)], 0,
                                                 dict(kwargs, max_newton_steps=1)))
    assert len(records) == 2 and len(caught) == 1 and "did not converge" in caught[0]
    assert (early.abs() >= want.abs()).all() and not torch.equal(early, want)


def test_two_dimensional_mesh():
    """A 2 x 2 mesh: a group across one mesh dimension reduces over that one only; across both,
    one all_reduce per mesh dimension."""
    p = pool(4)
    full = torch.randn(9, 7)
    op_index = 0  # group_shrink_
    op = helpers.OPS[op_index]
    for spec, dim, calls in [(("S0", "S1"), 1, 1), (("S0", "S1"), 0, 1),
                             (("S0", "S1"), (0, 1), 2), (("S0", "S0"), 0, 2),
                             (("R", "S1"), 0, 0)]:
        got, records = one_result(p.run(W.run_op, op_index, full, spec, dim, None, (2, 2)))
        want = helpers.run(op, full.clone(), None, dim)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=f"{spec} dim={dim}")
        assert len(records) == calls, (spec, dim, records)


@pytest.mark.parametrize("world", [2, 3])
def test_group_norms_of_dtensor(world):
    full = torch.randn(7, 5)
    for spec, dim, placement in [(("S0",), 0, "Replicate()"), (("S0",), 1, "Shard(dim=0)"),
                                 (("S1",), 1, "Replicate()")]:
        norms, placements = one_result(pool(world).run(W.sharded_group_norms, full, spec, dim))
        torch.testing.assert_close(norms, fastprox.group_norms(full, dim))
        assert placements == [placement]


def test_bad_input_raises_before_touching_the_weight():
    out = one_result(pool(2).run(W.bad_inputs))
    assert out["negative"][0] == "ValueError" and "lam_group[0]" in out["negative"][1]
    assert out["nan"][0] == "ValueError" and "lam_exclusive[0]" in out["nan"][1]
    assert out["dim"][0] == "ValueError" and "dim 2 is out of range" in out["dim"][1]
    assert out["partial"][0] == "ValueError" and "weights[1]" in out["partial"][1] \
        and "Partial" in out["partial"][1]
    assert out["steps"][0] == "ValueError" and "max_newton_steps" in out["steps"][1]
    assert out["int"][0] == "TypeError" and "int32" in out["int"][1]
    assert out["complex"][0] == "TypeError" and "lam_group[0]" in out["complex"][1]


# -- training ----------------------------------------------------------------------------------

def _data(rows: int = 48):
    torch.manual_seed(torch.randint(2**31, ()).item())
    return torch.randn(rows, 10), torch.randint(0, 3, (rows,))


def test_ddp_replicas_stay_bit_identical():
    """DDP on 2 gloo ranks, 150 steps with the proximal group lasso after every optimizer step:
    the replicas are bit-identical and input units were removed; the first 20 steps match a
    one-process run (later, float differences of the gradient averaging may flip a group at
    its threshold, so the comparison stops there)."""
    model = W.mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    snapshot, params = one_result(  # bit-identical on every rank, at both points
        pool(2).run(W.ddp_train, state, x, y, 150, "group_lasso", 0.04, 20))
    dead = sum(int((params[f"{i}.weight"].abs().sum(0) == 0).sum()) for i in (0, 2, 4))
    assert dead > 0, "the proximal step removed no input unit"
    single = W.mlp()
    single.load_state_dict(state)
    _, want = W.train(single, single, x, y, 20, "group_lasso", 0.04, snapshot_at=20)
    for name, p in want.items():
        torch.testing.assert_close(snapshot[name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("preset,lam,overrides", [
    ("group_lasso", 0.065, {"2": {"dim": 1}}),   # columns across shards; rows of layer 2 within
    ("cges", 0.1, None),                         # group step + CGES's exclusive bound
    ("exclusive", 0.1, None),                    # exact exclusive: Newton across shards
])
def test_fsdp2_trains_like_one_process(world, preset, lam, overrides):
    """An MLP under FSDP2's fully_shard (Shard(0), uneven shards) trains with the proximal
    regularizer attached and ends where a one-process run ends; its penalty agrees too."""
    model = W.mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    params, penalty, grads, idle, records = one_result(
        pool(world).run(W.fsdp_train, state, x, y, 30, preset, lam, overrides))
    single = W.mlp()
    single.load_state_dict(state)
    reg, _ = W.train(single, single, x, y, 30, preset, lam, overrides)
    reg.prox_step(lr=1e-3)
    zeros = 0
    for name, p in single.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(params[name] == 0, p.detach() == 0), f"{name}: zero pattern"
        zeros += int((p == 0).sum())
    assert zeros > 0, "the proximal steps zeroed nothing"
    assert math.isclose(penalty, reg.penalty().item(), rel_tol=1e-5)
    single.zero_grad(set_to_none=True)
    reg.penalty().backward()
    want = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and len(want) == 3
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"grad {name}")
    assert idle == []
    # the column groups of every weight span shards (layer 2's rows, when overridden, do not)
    groups = 10 + 13 + 7 if overrides is None else 10 + 7
    if preset == "group_lasso":
        assert records == [("c10d.allreduce_.default", 4 * groups)]
    elif preset == "cges":  # sum of squares and of |w| per group, one collective
        assert records == [("c10d.allreduce_.default", 4 * 2 * groups)]
    else:
        assert len(records) >= 2 and records[0][1] == 4 * 2 * groups


def test_plain_tensors_do_not_import_torch_distributed_tensor():
    """The DTensor check costs nothing for programs that never made one."""
    import subprocess
    import sys

    code = ("import sys, torch, fastprox; w = torch.randn(4, 3); fastprox.group_shrink_(w, .1);"
            "fastprox.foreach_prox_([w], lam_group=.1);"
            "print('torch.distributed.tensor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_adamw_metric_step_trains_like_one_process(world):
    """FSDP2 (Shard(0), uneven) with AdamW: the metric step on DTensor weights and moments
    (columns span shards: the full tensor; layer 2's rows lie within shards: the local
    shards) ends where a one-process run ends, zero pattern included. Fixed data: at this
    strength some groups go and most stay."""
    torch.manual_seed(1)
    model = W.mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    params = one_result(pool(world).run(W.fsdp_adamw_train, state, x, y, 30, 3e-3))
    single = W.mlp()
    single.load_state_dict(state)
    W.adamw_train(single, x, y, 30, 3e-3)
    zeros = 0
    for name, p in single.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(params[name] == 0, p.detach() == 0), f"{name}: zero pattern"
        zeros += int((p == 0).sum())
    total = sum(p.numel() for n, p in single.named_parameters() if n.endswith("weight"))
    assert 0 < zeros < total / 2, "the metric steps zeroed nothing, or most weights"
