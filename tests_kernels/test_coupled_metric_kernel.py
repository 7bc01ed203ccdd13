"""coupled_metric_prox_ on every backend, through the dispatcher: the coupled step in an
optimizer's metric against the float64 oracle (per group, the plain reference step on its
joined slices: tests/coupled_metric_cases.py), in the direct and Adam metrics, over every layout
a model gives, groups longer than a tile, sets sharing a tensor, members and moments of
different dtypes, direct metrics beyond float32's sums, with every check before any write."""

from __future__ import annotations

import math

import pytest
import torch

import fastprox
from coupled_metric_cases import LAMS, oracle, random_set, tolerance, wide_set
from fastprox.metric import coupled_metric_prox_, coupled_metric_step
from kernel_calls import DEVICE


def _close(got, want, dtype):
    torch.testing.assert_close(got.detach().double().cpu(), want, equal_nan=True,
                               **tolerance(dtype))


def _ids(d):
    return ",".join(f"{k}={v}" for k, v in d.items())


def _adam_rows(n):
    """Per member, (scale, eps, lr) of different parameter groups' metrics."""
    return [(1.0 / (1 - 0.999 ** (3 + k)), 1e-8 * (k + 1), 1e-3 * (1 + 0.5 * k))
            for k in range(n)]


def _adam_ds(vs, rows):
    return [((v.double() * s).sqrt() + e) / lr for v, (s, e, lr) in zip(vs, rows)]


def _args(lams):
    return (lams.get("lam_l1", 0.0), lams.get("lam_group", 0.0), lams.get("lam_exclusive", 0.0))


@pytest.mark.parametrize("special", [False, True], ids=["plain", "zero-nan-inf-d0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lams", LAMS, ids=_ids)
def test_direct_metric_matches_the_oracle(backend, lams, dtype, special):
    groups, members, ds = random_set(dtype, DEVICE, special=special)
    want = oracle(groups, ds, **lams)
    coupled_metric_prox_(groups, ds, **lams)
    for got, w in zip(members, want):
        _close(got, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("lams", LAMS[:5], ids=_ids)
def test_adam_metric_matches_the_oracle(backend, lams, dtype):
    """Moments and (scale, eps, lr) per member: d formed in the kernel."""
    groups, members, vs = random_set(dtype, DEVICE)
    vs = [v * 1e-6 for v in vs]
    rows = _adam_rows(len(members))
    want = oracle(groups, _adam_ds(vs, rows), **lams)
    coupled_metric_step([groups], [vs], [rows], [_args(lams)], [lams.get("size_weighted", True)],
                        [lams.get("exact", True)])
    for got, w in zip(members, want):
        _close(got, w, dtype)


def test_many_groups_of_narrow_columns_match_the_oracle(backend):
    """Many groups, most of their slices a few elements of every row (columns, 1x1 and 3x3 input
    channels, one member permuted, one strided), in Adam's metric."""
    groups, members, vs = wide_set(torch.float32, groups=96, device=DEVICE)
    vs = [v * 1e-6 for v in vs]
    rows = _adam_rows(len(members))
    lams = dict(lam_l1=1e-3, lam_group=2.0, lam_exclusive=1e-3)
    want = oracle(groups, _adam_ds(vs, rows), **lams)
    coupled_metric_step([groups], [vs], [rows], [tuple(lams.values())], [True], [True])
    for got, w in zip(members, want):
        _close(got, w, torch.float32)
    dead = int((want[0] == 0).all(dim=1).sum())
    assert 0 < dead < groups.num_groups  # some groups zero, some solved by Newton's method


def _heads_set(dtype, heads=3, width=8, model=700):
    """Attention-like heads: a fused QKV projection's columns (three runs of consecutive
    positions per head), its bias, the output projection's rows, a permuted 4-D view (a region
    of more than two dims), and a member with no element. Groups of several thousand elements:
    more than one tile each."""
    qkv = torch.randn(model, 3 * heads * width, dtype=dtype, device=DEVICE) * 0.05
    bias = torch.randn(3 * heads * width, dtype=dtype, device=DEVICE) * 0.05
    proj = torch.randn(heads * width, model, dtype=dtype, device=DEVICE) * 0.05
    conv = (torch.randn(5, 4, 3, heads * width, dtype=dtype, device=DEVICE) * 0.05
            ).permute(3, 2, 0, 1)  # (channels, 3, 5, 4), not contiguous
    empty = torch.empty(0, heads * width, dtype=dtype, device=DEVICE)
    head = [p // width for p in range(heads * width)]
    slices = [(qkv, 1, head * 3, "qkv"), (bias, 0, head * 3, "bias"), (proj, 0, head, "proj"),
              (conv, 0, head, "conv"), (empty, 1, head, "empty")]
    members = [qkv, bias, proj, conv, empty]
    groups = fastprox.CoupledGroups(slices, heads, name="heads")
    vs = [torch.rand(m.shape, dtype=torch.float64, device=DEVICE).to(dtype) + 0.1
          for m in members]
    return groups, members, vs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_long_groups_of_runs_and_views_match_the_oracle(backend, dtype):
    groups, members, vs = _heads_set(dtype)
    assert int(groups.sizes.min()) > 4096  # several tiles a group
    start = [m.clone() for m in members]
    vs = [v * 1e-6 for v in vs]
    rows = _adam_rows(len(members))
    lams = dict(lam_l1=2e-4, lam_group=0.02, lam_exclusive=1e-4)
    want = oracle(groups, _adam_ds(vs, rows), **lams)
    coupled_metric_step([groups], [vs], [rows], [tuple(lams.values())], [True], [True])
    for got, w in zip(members, want):
        _close(got, w, dtype)
    moved = want[0].reshape(700, 3, 3, 8) - start[0].double().cpu().reshape(700, 3, 3, 8)
    assert bool((moved.abs().amax(dim=(0, 1, 3)) > 1e-4).all())  # every head shrunk, none 0
    assert bool((want[0].reshape(700, 3, 3, 8).abs().amax(dim=(0, 1, 3)) > 0).all())



# (rows of the two consumers, the producer's row, groups): groups of ~1500 elements, dozens to a
# block; of ~5000, a block grown or cut to a whole vector of groups; of ~10000, too big for that
COLUMN_SETS = {"many": (701, 467, 331, 50), "grown": (2001, 1999, 1003, 37),
               "few": (4001, 3999, 2003, 37)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", list(COLUMN_SETS))
def test_column_groups_in_blocks_of_every_size_match_the_oracle(backend, size, dtype):
    """Groups whose slices are mostly single columns of long rows (a Linear's input units, a
    1x1 convolution's input channels) beside a producer's rows and a bias, in Adam's metric:
    row and group counts that are not multiples of a vector, groups from a few dozen elements
    to ~10000 (from many groups to a block of the kernel's to a few). Per-group scales from 0.1
    to 1: some groups become 0, the others are shrunk."""
    outer1, outer2, width, g = COLUMN_SETS[size]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    scale = torch.linspace(0.1, 1.0, g, dtype=torch.float64)[torch.randperm(g, generator=gen)]

    def member(shape, axis):
        w = torch.randn(shape, dtype=torch.float64, generator=gen) * 0.2
        view = [1] * len(shape)
        view[axis] = g
        return (w * scale.reshape(view)).to(dtype).to(DEVICE)

    fc = member((outer1, g), 1)              # input units of a Linear
    conv = member((outer2, g, 1, 1), 1)      # input channels of a 1x1 convolution
    rows = member((g, width), 0)             # the producer's output units
    bias = member((g,), 0)
    members = [fc, conv, rows, bias]
    order = list(range(g))
    groups = fastprox.CoupledGroups([(m, axis, order, name) for m, axis, name in
                                     zip(members, (1, 1, 0, 0), ("fc", "conv", "rows", "bias"))],
                                    g, name=size)
    vs = [(torch.rand(m.shape, dtype=torch.float64, generator=gen) * 2 + 0.05).mul_(1e-6)
          .to(dtype).to(DEVICE) for m in members]
    rows_ = _adam_rows(len(members))
    lams = dict(lam_l1=1e-3, lam_group=2.0, lam_exclusive=0.0)
    want = oracle(groups, _adam_ds(vs, rows_), **lams)
    coupled_metric_step([groups], [vs], [rows_], [tuple(lams.values())], [True], [True])
    for got, w in zip(members, want):
        _close(got, w, dtype)
    dead = int((want[2] == 0).all(dim=1).sum())
    assert 0 < dead < g  # some groups zero, some shrunk

def test_sets_sharing_a_tensor_run_in_order(backend):
    """A conv weight in two sets (its output channels in one, its input channels in the next):
    one call, the second set reads what the first wrote."""
    kw = dict(dtype=torch.float64, device=DEVICE)
    w1, w2, b1 = torch.randn(6, 4, 3, 3, **kw), torch.randn(5, 6, 3, 3, **kw), torch.randn(6, **kw)
    first = fastprox.CoupledGroups([(w1, 0, range(6)), (b1, 0, range(6))], 6, name="a")
    second = fastprox.CoupledGroups([(w2, 0, range(5)), (w1, 1, [0, 1, 2, 3])], 5, name="b")
    ds = {id(t): torch.rand(t.shape, **kw) + 0.1 for t in (w1, w2, b1)}
    want1 = oracle(first, [ds[id(w1)], ds[id(b1)]], lam_group=0.3)
    after_first = fastprox.CoupledGroups(
        [(w2.cpu().clone(), 0, range(5)), (want1[0].clone(), 1, [0, 1, 2, 3])], 5)
    want2 = oracle(after_first, [ds[id(w2)], ds[id(w1)]], lam_group=0.3)
    lams = (0.0, 0.3, 0.0)
    coupled_metric_step([first, second], [[ds[id(w1)], ds[id(b1)]], [ds[id(w2)], ds[id(w1)]]],
                        [None, None], [lams, lams], [True, True], [True, True], direct=True)
    torch.testing.assert_close(b1.cpu(), want1[1])
    torch.testing.assert_close(w2.cpu(), want2[0])
    torch.testing.assert_close(w1.cpu(), want2[1])


def test_members_and_moments_of_different_dtypes(backend):
    """A bfloat16 member beside float32 ones, moments in float16 and float32, and a second set
    with a float64 member: each group solved as the oracle solves it (in float32, float64 for
    the set holding the float64 member)."""
    groups, members, ds = random_set(torch.float32, DEVICE)
    with torch.no_grad():
        low = members[1].to(torch.bfloat16)
    slices = [(low if k == 1 else m.tensor, m.axis, m.index.tolist(), m.name)
              for k, m in enumerate(groups.slices)]
    groups = fastprox.CoupledGroups(slices, groups.num_groups, name="mixed")
    members = [s[0] for s in slices]
    ds = [d.to(torch.float16) if k == 2 else d for k, d in enumerate(ds)]
    other, other_members, other_ds = random_set(torch.float32, DEVICE)
    wide = other_members[0].double()
    slices2 = [(wide if k == 0 else m.tensor, m.axis, m.index.tolist(), m.name)
               for k, m in enumerate(other.slices)]
    other = fastprox.CoupledGroups(slices2, other.num_groups, name="wide")
    other_members = [s[0] for s in slices2]
    lams = dict(lam_l1=0.02, lam_group=0.25, lam_exclusive=0.03)
    want = oracle(groups, ds, **lams)
    want2 = oracle(other, other_ds, **lams)
    args = tuple(lams.values())
    coupled_metric_step([groups, other], [ds, other_ds], [None, None], [args, args],
                        [True, True], [True, True], direct=True)
    for got, w in zip(members, want):
        _close(got, w, torch.bfloat16 if got.dtype == torch.bfloat16 else torch.float32)
    for got, w in zip(other_members, want2):
        _close(got, w, torch.float32)


def test_direct_metrics_beyond_float32_sums(backend):
    """d up to 1e20 on float32 members: (d x)^2 would overflow float32, the sums run in
    float64, the result is the oracle's."""
    groups, members, ds = random_set(torch.float32, DEVICE)
    ds = [d.double() * 10.0 ** torch.randint(-2, 21, d.shape, device=DEVICE) for d in ds]
    lams = dict(lam_l1=1e8, lam_group=1e12, lam_exclusive=1e3)
    want = oracle(groups, ds, **lams)
    coupled_metric_prox_(groups, ds, **lams)
    assert all(bool(torch.isfinite(m).all()) for m in members)
    for got, w in zip(members, want):
        _close(got, w, torch.float32)


def test_lam_zero_and_groups_without_thresholds_are_bit_identical(backend):
    groups, members, ds = random_set(torch.float32, DEVICE)
    with torch.no_grad():
        members[0][0, 0] = float("nan")
    before = [m.clone() for m in members]
    coupled_metric_prox_(groups, ds)
    coupled_metric_prox_(groups, ds, lam_group=0.0, lam_l1=0.0, lam_exclusive=0.0)
    for a, b in zip(members, before):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    one = torch.tensor([[0.5]], device=DEVICE)
    g = fastprox.CoupledGroups([(one, 0, [0])], 1)
    coupled_metric_prox_(g, [torch.tensor([[2.0]], device=DEVICE)], lam_group=0.1)
    torch.testing.assert_close(one.cpu(), torch.tensor([[0.45]]))  # z (1 - t / (d |z|))


def test_groups_without_a_threshold_are_left_bit_identical(backend):
    """The op with a threshold per group, some 0 (no l1, no exclusive term): those groups keep
    their bits (a NaN payload included), the others are the oracle's step by their own t_g."""
    from fastprox.metric import _slice_table

    groups, members, ds = random_set(torch.float32, DEVICE)
    slices, starts = _slice_table(groups)
    t = 0.3 * groups.sizes.double().sqrt()
    off = torch.tensor([g % 2 == 1 for g in range(groups.num_groups)])
    t[off] = 0.0
    with torch.no_grad():
        view = members[1].movedim(1, 0)  # group by column: column 1 is group 1 (no threshold)
        view[1, 0] = float("nan")
    before = [m.clone() for m in members]
    want = oracle(groups, ds, lam_group=0.3)
    torch.ops.fastprox.coupled_metric_prox_(
        members, list(ds), [m.axis for m in groups.slices],
        torch.tensor([(1.0, 0.0, 1.0)] * len(members), dtype=torch.float64), [len(members)],
        [slices], [starts], [t], [0.0], [0.0], [True], True)
    for k, (m, got, old, w) in enumerate(zip(groups.slices, members, before, want)):
        index = m.index.tolist()
        for p, g in enumerate(index):
            a, b = got.movedim(m.axis, 0)[p], old.movedim(m.axis, 0)[p]
            if off[g]:
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (k, p)
            else:
                torch.testing.assert_close(a.double().cpu(), w.movedim(m.axis, 0)[p],
                                           **tolerance(torch.float32))


@pytest.mark.parametrize("damage", ["negative", "nan", "inf"])
def test_a_damaged_moment_of_the_second_set_leaves_every_member_unwritten(backend, damage):
    groups, members, ds = random_set(torch.float32, DEVICE)
    other, other_members, other_ds = random_set(torch.float32, DEVICE)
    other_ds[2] = other_ds[2].clone()
    other_ds[2][0] = {"negative": -1.0, "nan": math.nan, "inf": math.inf}[damage]
    before = [m.clone() for m in members + other_members]
    lams = (0.01, 0.2, 0.0)
    with pytest.raises(ValueError, match="coupled_metric_prox_: .*\\[7\\]"):
        coupled_metric_step([groups, other], [ds, other_ds], [None, None], [lams, lams],
                            [True, True], [True, True], direct=True)
    for a, b in zip(members + other_members, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
