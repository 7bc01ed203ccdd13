"""foreach_prox_: a list of tensors in one call equals the single-tensor operators, bit for bit."""

import pytest
import torch

import fastprox
from fastprox import reference
from helpers import DTYPES, TOLERANCES, random_weight

# (shape, dim): rows, columns (in-cache tiles and, 2048x2048, the single-tensor column path),
# conv filters and input channels, CGES's dim=0 of a conv, 1-D, odd and degenerate sizes.
LAYOUTS = [
    ((5, 7), None), ((40, 300), 0), ((300, 17), 0), ((2048, 2048), 0), ((1, 1), 0),
    ((64, 3, 3, 3), None), ((48, 20, 3, 3), (0, 2, 3)), ((16, 8, 5, 5), 0), ((1000,), 0),
    ((0, 9), 0), ((7, 0), None), ((3, 130, 2), (0, 2)), ((33, 5, 4, 2), (1, 3)),
]

# (lam_l1, lam_group, lam_exclusive, the operator that does the same to one tensor)
COMBOS = {
    "group": (0, 0.08, 0, lambda w, d, sw, ex: fastprox.group_shrink_(w, 0.08, d, size_weighted=sw)),
    "lasso": (0.4, 0, 0, lambda w, d, sw, ex: fastprox.soft_threshold_(w, 0.4)),
    "sparse_group": (0.2, 0.05, 0, lambda w, d, sw, ex: fastprox.sparse_group_shrink_(
        w, 0.2, 0.05, d, size_weighted=sw)),
    "exclusive": (0, 0, 0.03, lambda w, d, sw, ex: fastprox.exclusive_shrink_(w, 0.03, d, exact=ex)),
    "cges": (0, 0.05, 0.02, lambda w, d, sw, ex: fastprox.cges_shrink_(
        w, 0.05, 0.02, d, size_weighted=sw, exact=ex)),
}


def _weights(dtype, layouts=LAYOUTS):
    return [random_weight(shape, dtype) for shape, _ in layouts], [d for _, d in layouts]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combo", list(COMBOS))
def test_equals_single_tensor_operators_bitwise(combo, dtype):
    l1, lg, le, single = COMBOS[combo]
    weights, dims = _weights(dtype)
    flags_sw = [i % 2 == 0 for i in range(len(weights))]
    flags_ex = [i % 3 != 0 for i in range(len(weights))]
    got = [w.clone() for w in weights]
    out = fastprox.foreach_prox_(got, lam_l1=l1, lam_group=lg, lam_exclusive=le, dim=dims,
                                 size_weighted=flags_sw, exact=flags_ex)
    assert out is got
    for i, (w, d) in enumerate(zip(weights, dims)):
        want = single(w.clone(), d, flags_sw[i], flags_ex[i])
        assert torch.equal(got[i], want) or (got[i].isnan() == want.isnan()).all() and torch.equal(
            got[i].nan_to_num(), want.nan_to_num()), f"tensor {i} {tuple(w.shape)} dim={d}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_thresholds_and_all_three_steps_match_reference(dtype):
    weights, dims = _weights(dtype)
    n = len(weights)
    lams = dict(lam_l1=[0.05 * (i % 3) for i in range(n)],
                lam_group=[0.04 * ((i + 1) % 3) for i in range(n)],
                lam_exclusive=torch.tensor([0.01 * (i % 2) for i in range(n)]))
    got = [w.clone() for w in weights]
    fastprox.foreach_prox_(got, dim=dims, **lams)
    want = [w.to(torch.float64) for w in weights]
    reference.foreach_prox_(want, dim=dims, lam_l1=lams["lam_l1"], lam_group=lams["lam_group"],
                            lam_exclusive=[float(x) for x in lams["lam_exclusive"]])
    # Three rounded steps in the reference (16-bit) vs one rounding in the kernel: 3x tolerance.
    tol = TOLERANCES[dtype]
    for g, w in zip(got, want):
        scale = max(w.abs().max().item() if w.numel() else 1.0, 1.0)
        torch.testing.assert_close(g.to(torch.float64), w, rtol=3 * tol["rtol"],
                                   atol=3 * tol["atol"] * scale)


def test_views_are_updated_in_place_and_the_rest_untouched():
    base, other = torch.randn(64, 90), torch.randn(30, 12)
    keep = base.clone()
    # (views of one storage whose address ranges interleave are refused: see test_bad_input)
    def views_of(a, b):
        return [a[:32, :40].t(), a[32::2, 40:80], b[:, 5]]

    views, copies = views_of(base, other), views_of(base.clone(), other.clone())
    fastprox.foreach_prox_(views, lam_group=0.5, dim=[0, 0, 0])
    for v, c in zip(views, copies):  # same layouts, so the same sums: bitwise equal
        assert torch.equal(v, fastprox.group_shrink_(c, 0.5, 0))
    assert torch.equal(base[:, 80:], keep[:, 80:]) and torch.equal(base[32:, :40], keep[32:, :40])
    assert torch.equal(base[33::2, 40:80], keep[33::2, 40:80])


def test_zero_lams_nan_and_empty_list():
    w = torch.randn(20, 30)
    w[3, 4] = float("nan")
    w[5, 6] = float("inf")
    before = w.clone()
    fastprox.foreach_prox_([w], lam_l1=0, lam_group=0, lam_exclusive=0)
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))
    assert fastprox.foreach_prox_([], lam_group=1.0) == []
    fastprox.foreach_prox_([w], lam_group=0.1, dim=1)  # row 3 becomes NaN, row 5 keeps its values
    assert w[3].isnan().all() and torch.equal(w[5], before[5])
    z = torch.zeros(8, 8)
    fastprox.foreach_prox_([z], lam_group=1.0, lam_exclusive=1.0, dim=0)
    assert torch.equal(z, torch.zeros(8, 8))
    huge = torch.randn(6, 9)
    fastprox.foreach_prox_([huge], lam_group=1e300)
    assert torch.equal(huge, torch.zeros(6, 9))


def test_bitwise_identical_across_threads():
    weights, dims = _weights(torch.float32)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            ws = [w.clone() for w in weights]
            fastprox.foreach_prox_(ws, lam_group=0.05, lam_exclusive=0.02, dim=dims)
            results.append(ws)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_versions_bumped_and_opcheck():
    ws = [torch.randn(6, 7), torch.randn(3, 4, 2, 2)]
    versions = [w._version for w in ws]
    fastprox.foreach_prox_(ws, lam_group=0.1)
    assert all(w._version > v for w, v in zip(ws, versions))
    lams = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.1, 0.05]], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastprox.foreach_prox_.default,
                          ([torch.randn(6, 7), torch.randn(3, 4, 2, 2)], lams, [0, 1, 2, 3],
                           [1, 3], [True, False], [True, True], "foreach_prox_",
                           ["lam_l1", "lam_group", "lam_exclusive"]))


def test_compile_fullgraph():
    ws = [torch.randn(16, 12), torch.randn(8, 4, 3, 3)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b):
        fastprox.foreach_prox_([a, b], lam_group=0.2, dim=[0, (0, 2, 3)])
        return a.sum() + b.sum()

    want = [w.clone() for w in ws]
    fastprox.foreach_prox_(want, lam_group=0.2, dim=[0, (0, 2, 3)])
    step(*ws)
    assert all(torch.equal(a, b) for a, b in zip(ws, want))


BAD = [
    (lambda ws: dict(weights=ws[0]), TypeError, "weights must be a list"),
    (lambda ws: dict(weights=[ws[0], "x"]), TypeError, r"weights\[1\] must be a torch.Tensor"),
    (lambda ws: dict(weights=[ws[0], ws[1].int()]), TypeError, r"weights\[1\] must be float32"),
    (lambda ws: dict(weights=ws, lam_group=[0.1]), ValueError, "lam_group has 1 entries for 2"),
    (lambda ws: dict(weights=ws, lam_group=[0.1, -1.0]), ValueError, r"lam_group\[1\] must be a finite"),
    (lambda ws: dict(weights=ws, lam_l1=float("nan")), ValueError, r"lam_l1\[0\] must be a finite"),
    (lambda ws: dict(weights=ws, lam_exclusive="big"), TypeError, "lam_exclusive must be"),
    (lambda ws: dict(weights=ws, lam_group=[0.1, torch.tensor(1j)]), TypeError,
     r"lam_group\[1\] must be a real number"),
    (lambda ws: dict(weights=ws, lam_group=0.1, dim=[0, 5]), ValueError, r"weights\[1\]: dim 5"),
    (lambda ws: dict(weights=ws, lam_group=0.1, dim=[0]), ValueError, "dim has 1 entries"),
    (lambda ws: dict(weights=ws, lam_group=0.1, exact=[True, 1]), TypeError, r"exact\[1\]"),
    (lambda ws: dict(weights=[ws[0], ws[0]], lam_group=0.1), ValueError, "share memory"),
    (lambda ws: dict(weights=[ws[0], ws[0][:2]], lam_group=0.1), ValueError, "share memory"),
    (lambda ws: dict(weights=[ws[0][:, :3], ws[0][:, 3:]], lam_group=0.1), ValueError,
     "share memory"),  # disjoint elements, interleaved address ranges: refused, conservatively
    (lambda ws: dict(weights=[ws[0], ws[1].requires_grad_()], lam_group=0.1), RuntimeError,
     r"weights\[1\]"),
    (lambda ws: dict(weights=[ws[0], ws[1].to("meta")], lam_group=0.1), ValueError,
     r"weights\[1\] is on meta"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_the_argument_and_touches_nothing(case):
    make, error, message = BAD[case]
    ws = [torch.randn(5, 6), torch.randn(4, 3)]
    before = [w.clone() for w in ws]
    kwargs = make(ws)
    weights = kwargs.pop("weights")
    with pytest.raises(error, match=message):
        fastprox.foreach_prox_(weights, **kwargs)
    for w, b in zip(ws, before):
        assert torch.equal(w.detach(), b)
