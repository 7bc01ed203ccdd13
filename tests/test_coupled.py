"""Coupled groups (fastprox/coupled.py): the step against the float64 reference on random coupled
sets, optimality (KKT) without a reference, edge cases, bad input and determinism."""

from __future__ import annotations

import pytest
import torch

import fastprox
from fastprox import CoupledGroups, Slice, coupled, reference
from fastprox.operators import BY_NAME

from helpers import DTYPES, TOLERANCES
from phase_checks import check_phase_ops

ROW = BY_NAME["coupled_prox_"]
SAMPLES = [(dict(zip(("lam_l1", "lam_group", "lam_exclusive"), lams)), flags)
           for lams, flags in ROW.samples]
IDS = [",".join(f"{k}={v}" for k, v in {**lams, **flags}.items() if v) for lams, flags in SAMPLES]


def random_set(dtype=torch.float64, groups=5, views=False):
    """A random coupled set like a conv channel: rows of a producer (4-D), entries of a norm
    layer (1-D), columns of a consumer (2-D, several columns per group, as after a flatten or
    for an attention head), and a transposed view."""
    counts = torch.randint(1, 4, (groups,))
    index = torch.repeat_interleave(torch.arange(groups), counts)
    index = index[torch.randperm(len(index))]
    s = len(index)
    producer = torch.randn(s, 3, 2, 2, dtype=dtype)
    norm = torch.randn(s, dtype=dtype)
    consumer = torch.randn(7, s, dtype=dtype)
    other = torch.randn(s, 4, dtype=dtype).t()  # a (4, s) non-contiguous view, slices on axis 1
    if views:
        big = torch.randn(9, 2 * s, dtype=dtype)
        consumer = big[1:8, ::2]  # strided
    members = [(producer, 0, index, "producer"), (norm, 0, index, "norm"),
               (consumer, 1, index, "consumer"), (other, 1, index, "other")]
    return members, groups


def run_both(members, groups, lams, flags):
    mine = [(m[0].clone(), *m[1:]) for m in members]
    ref = [(m[0].detach().to(torch.float64).clone(), *m[1:]) for m in members]
    fastprox.coupled_prox_(CoupledGroups([Slice(*m) for m in mine], groups), **lams, **flags)
    reference.coupled_prox_(ref, groups, **lams, **flags)
    return [m[0] for m in mine], [m[0] for m in ref]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lams,flags", SAMPLES, ids=IDS)
@pytest.mark.parametrize("views", [False, True], ids=["contiguous", "views"])
def test_matches_reference(dtype, lams, flags, views):
    members, groups = random_set(dtype, groups=6, views=views)
    scale = max(float(m[0].abs().max()) for m in members)
    mine, ref = run_both(members, groups, lams, flags)
    for m, r in zip(mine, ref):
        torch.testing.assert_close(m.to(torch.float64), r, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["atol"] * scale)


def test_step_acts_on_the_union():
    """A group lasso step over two tensors equals the per-tensor step of their concatenation,
    and differs from stepping each tensor alone."""
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    joined = torch.cat([a, b], dim=1)
    fastprox.group_shrink_(joined, 0.4, dim=1)
    index = torch.arange(4)
    sa, sb = a.clone(), b.clone()
    fastprox.coupled_prox_(CoupledGroups([(sa, 0, index), (sb, 0, index)], 4), lam_group=0.4)
    torch.testing.assert_close(torch.cat([sa, sb], dim=1), joined)
    alone = a.clone()
    fastprox.group_shrink_(alone, 0.4, dim=1)
    assert not torch.allclose(alone, sa)


def _union(members, groups):
    """Per group, the concatenated values of its slices (float64)."""
    out = []
    for g in range(groups):
        parts = [m[0].movedim(m[1], 0)[m[2] == g].reshape(-1).double() for m in members]
        out.append(torch.cat(parts))
    return out


@pytest.mark.parametrize("kind", ["group", "sparse_group", "exclusive"])
def test_kkt(kind):
    """Optimality of the result W for the input V, per coupled group, no reference needed:
    0 in W - V + lam * subgradient(Omega)(W)."""
    members, groups = random_set(torch.float64, groups=8)
    before = _union(members, groups)
    lams = {"group": dict(lam_group=0.35), "sparse_group": dict(lam_l1=0.3, lam_group=0.25),
            "exclusive": dict(lam_exclusive=0.15)}[kind]
    g = CoupledGroups([Slice(*m) for m in members], groups)
    fastprox.coupled_prox_(g, **lams)
    after = _union(members, groups)
    tol = 1e-9
    zeroed = 0
    for v, w in zip(before, after):
        n = v.numel()
        if kind == "group":
            t = lams["lam_group"] * n ** 0.5
            if w.norm() == 0:
                zeroed += 1
                assert v.norm() <= t + tol
            else:
                torch.testing.assert_close(v - w, t * w / w.norm())
        elif kind == "sparse_group":
            l1, t = lams["lam_l1"], lams["lam_group"] * n ** 0.5
            if w.norm() == 0:
                zeroed += 1
                soft = torch.sign(v) * (v.abs() - l1).clamp(min=0)
                assert soft.norm() <= t + tol
            else:
                r = v - w - t * w / w.norm()  # the L1 part of the subgradient
                nz = w != 0
                torch.testing.assert_close(r[nz], l1 * torch.sign(w[nz]))
                assert (r[~nz].abs() <= l1 + tol).all()
        else:
            lam = lams["lam_exclusive"]
            bound = lam * w.abs().sum()
            nz = w != 0
            torch.testing.assert_close((v - w)[nz], bound * torch.sign(w[nz]))
            assert (v[~nz].abs() <= bound + tol).all()
    if kind != "exclusive":
        assert 0 <= zeroed < groups  # the check covered live groups


def test_deterministic_across_runs_and_threads():
    members, groups = random_set(torch.float32, groups=40)
    outs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        mine, _ = run_both(members, groups, dict(lam_l1=0.1, lam_group=0.1,
                                                 lam_exclusive=0.02), {})
        outs.append(mine)
    torch.set_num_threads(2)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# -- edge cases ---------------------------------------------------------------------------------
def test_zero_nan_inf_groups_and_huge_lam():
    index = torch.tensor([0, 1, 2, 3])
    a = torch.randn(4, 3)
    b = torch.randn(5, 4)
    a[0], b[:, 0] = 0, 0                       # group 0: all zero
    a[1, 1] = float("nan")                     # group 1: a NaN
    b[2, 2] = float("inf")                     # group 2: infinite norm
    g = CoupledGroups([(a, 0, index, "a"), (b, 1, index, "b")], 4)
    keep_a, keep_b = a.clone(), b.clone()
    fastprox.coupled_prox_(g, lam_group=0.5)
    assert (a[0] == 0).all() and (b[:, 0] == 0).all()
    assert a[1].isnan().all() and b[:, 1].isnan().all()
    torch.testing.assert_close(a[2], keep_a[2]) and torch.testing.assert_close(b[:, 2],
                                                                              keep_b[:, 2])
    c, d = torch.randn(4, 3), torch.randn(5, 4)
    g = CoupledGroups([(c, 0, index), (d, 1, index)], 4)
    fastprox.coupled_prox_(g, lam_group=1e30, lam_exclusive=1e30)
    assert (c == 0).all() and (d == 0).all()
    assert not g.alive().any()


def test_lam_zero_is_bit_identical_and_empty_and_single():
    a = torch.randn(3, 2)
    a[0, 0] = float("nan")
    before = a.clone()
    g = CoupledGroups([(a, 0, [0, 1, 1])], 2)
    fastprox.coupled_prox_(g)
    assert torch.equal(a.view(torch.int32), before.view(torch.int32))
    empty = torch.zeros(0, 4)
    one = torch.tensor([2.0])
    g = CoupledGroups([(empty, 0, []), (one, 0, [0])], 1)
    fastprox.coupled_prox_(g, lam_group=0.5)
    assert one.item() == pytest.approx(1.5)
    fastprox.coupled_prox_(g, lam_exclusive=1.0)  # exact: the Newton phases, an empty member
    assert one.item() == pytest.approx(0.75)     # tau = lam |w| / (1 + lam) = 0.75
    assert CoupledGroups([(torch.zeros(0), 0, [])], 0).num_groups == 0


def test_norms_and_penalty():
    members, groups = random_set(torch.float64, groups=5)
    g = CoupledGroups([Slice(*m) for m in members], groups)
    expect = torch.stack([v.norm() for v in _union(members, groups)])
    torch.testing.assert_close(g.norms(), expect)
    assert g.sizes.tolist() == [v.numel() for v in _union(members, groups)]
    w = torch.zeros(3, 2, requires_grad=True)
    g = CoupledGroups([(w, 0, [0, 0, 1])], 2)
    g.penalty(lam_group=1.0).backward()
    assert torch.equal(w.grad, torch.zeros(3, 2))  # zero groups: gradient 0, not NaN


# -- bad input: refused before anything is written ---------------------------------------------
@pytest.mark.parametrize("make,error,words", [
    (lambda a, b: ([(a, 0, [0, 1, 5])], 3), ValueError, ["slices[0]", "outside [0, 3)"]),
    (lambda a, b: ([(a, 0, [0, -1, 1])], 3), ValueError, ["slices[0]", "outside"]),
    (lambda a, b: ([(a, 0, [0, 1])], 3), ValueError, ["slices[0]", "index has shape (2,)"]),
    (lambda a, b: ([(a, 2, [0, 1, 2])], 3), ValueError, ["slices[0]", "axis"]),
    (lambda a, b: ([(a, 0, [0, 1, 2], "w"), (a[1:], 0, [0, 1], "v")], 3), ValueError,
     ["share memory", "(w)", "(v)"]),
    (lambda a, b: ([(b[:, :2], 1, [0, 1]), (b[:, 2:], 1, [0, 1])], 3), ValueError,
     ["share memory"]),
    (lambda a, b: ([(a, 0, torch.tensor([0.0, 1.0, 2.0]))], 3), TypeError, ["integers"]),
    (lambda a, b: ([(torch.zeros(1, 4).expand(3, 4), 0, [0, 1, 2])], 3), ValueError,
     ["expanded"]),
    (lambda a, b: ([(a.int(), 0, [0, 1, 2])], 3), TypeError, ["float32"]),
    (lambda a, b: ([(a, 0, [0, 1, 2])], -1), ValueError, ["num_groups"]),
    (lambda a, b: ([], 3), ValueError, ["empty"]),
])
def test_bad_sets(make, error, words):
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    before = a.clone(), b.clone()
    slices, groups = make(a, b)
    with pytest.raises(error) as info:
        CoupledGroups(slices, groups)
    assert "CoupledGroups" in str(info.value)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("kwargs,words", [
    (dict(lam_group=-1.0), ["coupled_prox_", "lam_group"]),
    (dict(lam_exclusive=float("nan")), ["coupled_prox_", "lam_exclusive"]),
    (dict(lam_l1="0.1"), ["coupled_prox_", "lam_l1"]),
    (dict(lam_group=0.1, exact=1), ["coupled_prox_", "exact"]),
])
def test_bad_call_leaves_members_unchanged(kwargs, words):
    a = torch.randn(3, 4)
    before = a.clone()
    g = CoupledGroups([(a, 0, [0, 1, 2])], 3)
    with pytest.raises((ValueError, TypeError)) as info:
        fastprox.coupled_prox_(g, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert torch.equal(a, before)
    with pytest.raises(TypeError, match="coupled_prox_: groups"):
        fastprox.coupled_prox_([a], lam_group=0.1)


def test_requires_no_grad_mode():
    w = torch.nn.Parameter(torch.randn(3, 2))
    g = CoupledGroups([(w, 0, [0, 1, 2])], 3)
    with pytest.raises(RuntimeError, match="coupled_prox_.*no_grad"):
        fastprox.coupled_prox_(g, lam_group=0.1)
    with torch.no_grad():
        fastprox.coupled_prox_(g, lam_group=0.1)


def test_numpy_thresholds():
    np = pytest.importorskip("numpy")
    a = torch.randn(3, 4, dtype=torch.float64)
    b = a.clone()
    fastprox.coupled_prox_(CoupledGroups([(a, 0, [0, 1, 2])], 3), lam_group=np.float32(0.3))
    fastprox.group_shrink_(b, float(np.float32(0.3)), dim=1)
    torch.testing.assert_close(a, b)


# -- the phase ops (csrc/cpu/group_phases.cpp) against their reference -------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phase_ops_match_reference(dtype):
    """Every layout in one call (one parallel region), and each alone; views included."""
    check_phase_ops(torch.ops.fastprox, dtype, "cpu")


def test_phase_ops_opcheck_and_bad_input():
    ops = torch.ops.fastprox
    w, v = torch.randn(6, 5), torch.randn(3, 4)
    torch.library.opcheck(ops.foreach_group_sums, ([w, v], [1, 0], [1, 1], [0.1, 0.0], 3))
    torch.library.opcheck(ops.foreach_group_rewrite_,
                          ([w.clone(), v.clone()], [0, 1], [1, 1], [0.1, 0.0],
                           [torch.rand(5), None], [None, torch.rand(3)]))
    torch.library.opcheck(ops.foreach_group_sums_above,
                          ([w, v], [0, 1], [1, 1], [0.1, 0.0], [torch.rand(5), None],
                           [torch.rand(5), torch.rand(3)]))
    before = w.clone(), v.clone()
    with pytest.raises(ValueError, match="foreach_group_rewrite_: lam_l1\\[1\\]"):
        ops.foreach_group_rewrite_([w, v], [1, 1], [1, 1], [0.0, -1.0], [None, None],
                                   [None, None])
    with pytest.raises(ValueError, match="scales\\[1\\] has 5 values for 3 groups"):
        ops.foreach_group_rewrite_([w, v], [1, 1], [1, 1], [0.0, 0.0],
                                   [torch.rand(6), torch.rand(5)], [None, None])
    with pytest.raises(ValueError, match="share memory"):
        ops.foreach_group_rewrite_([w, w[:2]], [1, 1], [1, 1], [0.0, 0.0],
                                   [torch.rand(6), torch.rand(2)], [None, None])
    with pytest.raises(ValueError, match="foreach_group_sums_above: taus\\[0\\] has 5 values"):
        ops.foreach_group_sums_above([w], [1], [1], [0.0], [None], [torch.rand(5)])
    with pytest.raises(ValueError, match="foreach_group_sums: what"):
        ops.foreach_group_sums([w], [1], [1], [0.0], 4)
    assert torch.equal(w, before[0]) and torch.equal(v, before[1])


def test_dtensor_members_are_refused():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh  # noqa: F401

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = DTensor.from_local(torch.randn(3, 4), mesh, [Replicate()])
        with pytest.raises(TypeError, match="slices\\[0\\].tensor is a DTensor"):
            CoupledGroups([(w, 0, [0, 1, 2])], 3)
    finally:
        dist.destroy_process_group()


def _shared_sets(dtype=torch.float32):
    """Three sets over two convs and a norm layer: A the output channels of conv1 (its rows and
    the norm's entries), B conv1's input channels (its columns: conv1 again), C conv2's rows
    (shares nothing with A or B)."""
    conv1, conv2, norm = (torch.randn(6, 4, 3, 3, dtype=dtype), torch.randn(5, 6, 3, 3, dtype=dtype),
                          torch.randn(6, dtype=dtype))
    a = [(conv1, 0, torch.arange(6) // 2, "conv1 rows"), (norm, 0, torch.arange(6) // 2, "norm")]
    b = [(conv1, 1, torch.arange(4), "conv1 columns")]
    c = [(conv2, 0, torch.arange(5), "conv2 rows")]
    return [conv1, conv2, norm], [(a, 3), (b, 4), (c, 5)]


def test_waves_keep_the_order_of_sets_that_share_memory():
    _, made = _shared_sets()
    sets = [CoupledGroups([Slice(*m) for m in ms], n) for ms, n in made]
    assert coupled.waves(sets) == [[0, 2], [1]]
    assert coupled.waves(sets[::-1]) == [[0, 1], [2]]
    assert coupled.waves([sets[0]]) == [[0]]


@pytest.mark.parametrize("lams,flags", SAMPLES, ids=IDS)
def test_list_of_sets_is_each_set_in_turn(lams, flags):
    """A list of sets that share tensors (a conv's rows in one, its columns in another) is each
    set's step in the order given, bit for bit, and the reference's sequence within tolerance."""
    tensors, made = _shared_sets()
    together = [t.clone() for t in tensors]
    one_by_one = [t.clone() for t in tensors]

    def build(ts):
        index = {id(t): i for i, t in enumerate(tensors)}
        return [CoupledGroups([Slice(ts[index[id(m[0])]], *m[1:]) for m in ms], n)
                for ms, n in made]

    fastprox.coupled_prox_(build(together), **lams, **flags)
    for g in build(one_by_one):
        fastprox.coupled_prox_(g, **lams, **flags)
    for a, b in zip(together, one_by_one):
        assert torch.equal(a, b)
    ref = [t.to(torch.float64) for t in tensors]
    index = {id(t): i for i, t in enumerate(tensors)}
    for ms, n in made:
        reference.coupled_prox_([(ref[index[id(m[0])]], *m[1:]) for m in ms], n, **lams,
                                **flags)
    for a, b in zip(together, ref):
        torch.testing.assert_close(a.to(torch.float64), b, **TOLERANCES[torch.float32])
