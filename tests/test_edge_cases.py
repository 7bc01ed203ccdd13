"""Edge semantics of docs/SPEC.md, identical in kernels and reference: lam = 0, huge lam, the exact
threshold, zero groups, NaN and inf groups, thresholds as tensors."""

import math

import pytest
import torch

import fastprox
from helpers import DTYPES, GROUPED_OPS, OPS, assert_matches_reference, random_weight, run

REFERENCE_AND_FUSED = [True, False]


@pytest.mark.parametrize("fused", REFERENCE_AND_FUSED, ids=["kernel", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_lam_zero_is_bit_identical(op, dtype, fused):
    w = random_weight((9, 13), dtype)
    w[2, 3], w[4, 5], w[6, 0] = math.nan, math.inf, -0.0
    before = w.clone()
    for dim in ([None, 0] if op.grouped else [None]):
        run(op, w, lams=(0.0,) * len(op.lams), dim=dim, fused=fused)
        assert torch.equal(w.isnan(), before.isnan())
        assert w.view(torch.uint8).equal(before.view(torch.uint8)), "must be bit-identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_huge_lam_zeroes_everything(op, dtype):
    w = random_weight((7, 11), dtype)
    for huge in (1e6, 1e300):
        for dim in ([None, 0] if op.grouped else [None]):
            x = w.clone()
            run(op, x, lams=(huge,) * len(op.lams), dim=dim)
            assert not x.isnan().any()
            if op.name == "exclusive_shrink_":
                # The exact exclusive prox keeps a_max / (1 + lam) of the largest magnitude.
                assert x.abs().max().item() <= 2 * w.abs().max().item() / huge + 1e-30
            else:
                assert (x == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_exactly_at_threshold_is_zeroed(dtype):
    w = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]], dtype=dtype)  # norms 5, 10, 0
    fastprox.group_shrink_(w, 5.0, size_weighted=False)
    assert (w[0] == 0).all() and (w[2] == 0).all()
    torch.testing.assert_close(w[1].float(), torch.tensor([3.0, 4.0]))
    # sqrt(2) weighting: t = lam * sqrt(2) equals the norm 5 exactly when lam = 5 / sqrt(2)
    # is rounded the same way; just below the threshold the group survives, scaled.
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    fastprox.group_shrink_(w, 4.999, size_weighted=False)
    torch.testing.assert_close(w, torch.tensor([[3.0, 4.0]], dtype=torch.float64) * (1 - 4.999 / 5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", GROUPED_OPS, ids=str)
@pytest.mark.parametrize("dim", [None, 0, (0, 2, 3)])
def test_zero_groups_stay_zero_never_nan(op, dtype, dim):
    w = random_weight((6, 5, 3, 3), dtype)
    w[2] = 0
    w[:, 1] = 0
    w[:, :, 0, 0] = 0
    assert_matches_reference(op, w, dim=dim)
    assert not w.isnan().any()
    assert (w[2] == 0).all() and (w[:, 1] == 0).all() and (w[:, :, 0, 0] == 0).all()
    z = torch.zeros(4, 3, dtype=dtype)
    run(op, z, dim=dim if dim in (None, 0) else 0)
    assert (z == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", GROUPED_OPS, ids=str)
@pytest.mark.parametrize("dim", [None, 0])
def test_nan_and_inf_groups(op, dtype, dim):
    w = random_weight((8, 10), dtype) + 2  # no group is shrunk to zero by these lams
    if dim is None:  # rows are groups
        w[1, 3] = math.nan
        w[4, 7] = math.inf
        w[5, 2] = -math.inf
        nan_group, inf_groups, ok = w[1], (4, 5), [0, 2, 3, 6, 7]
    else:  # columns are groups
        w[3, 1] = math.nan
        w[7, 4] = math.inf
        w[2, 5] = -math.inf
        nan_group, inf_groups, ok = w[:, 1], (4, 5), [0, 2, 3, 6, 7, 8, 9]
    before = w.clone()
    assert_matches_reference(op, w, dim=dim)
    group = (lambda t, g: t[g]) if dim is None else (lambda t, g: t[:, g])
    assert group(w, 1).isnan().all(), "a group with a NaN becomes all NaN"
    for g in inf_groups:
        if op.name == "sparse_group_shrink_":  # the soft threshold still applies to an inf group
            want = fastprox.reference.soft_threshold_(group(before, g).double().clone(), op.lams[0])
            torch.testing.assert_close(group(w, g).double(), want, equal_nan=False,
                                       rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(group(w, g), group(before, g)), "an infinite group keeps its values"
    assert not w[:, ok].isnan().any() if dim == 0 else not w[ok].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_threshold_specials(dtype):
    w = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.3, -0.3, 2.0, -2.0], dtype=dtype)
    fastprox.soft_threshold_(w, 0.5)
    assert w[0].isnan()
    assert w[1] == math.inf and w[2] == -math.inf
    assert (w[3:7] == 0).all() and not w[3:7].isnan().any()
    torch.testing.assert_close(w[7:].float(), torch.tensor([1.5, -1.5]))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_tensor_thresholds_equal_numbers(op):
    w = random_weight((12, 9), torch.float32)
    a, b = w.clone(), w.clone()
    run(op, a)
    run(op, b, lams=tuple(torch.tensor(v, dtype=torch.float64) for v in op.lams))
    assert torch.equal(a, b)
    c = w.clone()
    run(op, c, lams=tuple(torch.tensor(v, dtype=torch.float32) for v in op.lams))
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_zero_lam_sub_step_is_skipped(dtype):
    # sparse_group_shrink_ with lam_group = 0 is the soft threshold alone: a NaN stays where it
    # is instead of spreading over its group through a group step that is not taken.
    w = torch.tensor([[0.0, math.nan, 3.0], [1.0, -2.0, 0.5]], dtype=dtype)
    x = w.clone()
    fastprox.sparse_group_shrink_(x, 0.5, 0.0)
    y = fastprox.soft_threshold_(w.clone(), 0.5)
    assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
    # cges_shrink_ with lam_group = 0 is the exclusive step alone, and with lam_exclusive = 0
    # the group step alone.
    for lams, alone in [((0.0, 0.2), lambda t: fastprox.exclusive_shrink_(t, 0.2)),
                        ((0.4, 0.0), lambda t: fastprox.group_shrink_(t, 0.4))]:
        v = torch.randn(5, 7).to(dtype)
        assert torch.equal(fastprox.cges_shrink_(v.clone(), *lams), alone(v.clone()))


@pytest.mark.parametrize("dim", [None, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_thresholds_beyond_the_accumulation_type(op, dtype, dim):
    """Finite thresholds whose value (lam, or t = lam * sqrt(n)) overflows the type the kernels
    compute in give the real threshold's result (the float64 reference's): a group holding inf
    keeps its values, an infinite element stays infinite under the soft threshold, every
    finite group is zeroed (the exclusive step: as the reference), never a NaN."""
    if dim is not None and not op.grouped:
        pytest.skip("elementwise")
    w = random_weight((8, 10), dtype)
    w[4, 7], w[5, 2] = math.inf, -math.inf  # rows 4, 5; columns 7, 2
    before = w.clone()
    huge = 1e308 if dtype == torch.float64 else 1e39  # t overflows float64 / float32
    assert_matches_reference(op, w, lams=(huge,) * len(op.lams), dim=dim)
    assert not w.isnan().any()
    assert w[4, 7] == math.inf and w[5, 2] == -math.inf
    if op.name in ("group_shrink_", "cges_shrink_"):
        kept = [4, 5] if dim is None else [7, 2]
        group = (lambda t, g: t[g]) if dim is None else (lambda t, g: t[:, g])
        for g in kept:
            assert torch.equal(group(w, g), group(before, g)), "an infinite group keeps its values"
        others = torch.ones(8 if dim is None else 10, dtype=torch.bool)
        others[kept] = False
        assert (w[others] if dim is None else w[:, others]).eq(0).all()


def test_coupled_and_metric_thresholds_beyond_float32():
    w = torch.randn(6, 5)
    w[2, 1] = math.inf
    before = w.clone()
    sets = fastprox.CoupledGroups([(w, 0, range(6))], 6)
    fastprox.coupled_prox_(sets, lam_l1=1e39, lam_group=1e39)
    assert w[2, 1] == math.inf and (w[2, [0, 2, 3, 4]] == 0).all()  # soft threshold, group kept
    assert (w[[0, 1, 3, 4, 5]] == 0).all() and not w.isnan().any()
    w = before.clone()
    fastprox.coupled_prox_(fastprox.CoupledGroups([(w, 0, range(6))], 6), lam_group=1e39)
    assert torch.equal(w[2], before[2]) and (w[[0, 1, 3, 4, 5]] == 0).all()
    for lams in (dict(lam_l1=1e39), dict(lam_group=1e39), dict(lam_l1=1e39, lam_group=1e39)):
        w = before.clone()
        v = torch.rand(6, 5) * 1e-4
        fastprox.foreach_metric_prox_([w], [v], lr=1e-3, step=5, **lams)
        want = before.double()
        fastprox.reference.metric_prox_(
            want, fastprox.reference.adam_metric(v.double(), lr=1e-3, eps=1e-8, beta2=0.999,
                                                 step=5), **lams)
        assert not w.isnan().any() and w[2, 1] == math.inf, lams
        torch.testing.assert_close(w.double(), want, equal_nan=False)
