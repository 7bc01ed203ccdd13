"""The proximal steps in an optimizer's metric (docs/SPEC.md, "Proximal steps in an optimizer's
metric"): the float64 reference (fastprox.reference.metric_prox_) against the optimality
conditions in the metric diag(d) on random inputs (no second implementation needed), against the
Euclidean operators where d is constant, on its edge cases, and the metric of a real Adam /
AdamW step against the step itself."""

from __future__ import annotations

import math

import pytest
import torch

from fastprox import reference
from helpers import metric_exclusive_kkt, metric_group_kkt

DIMS = [((9, 14), 1), ((14, 9), 0), ((6, 4, 3, 3), (1, 2, 3)), ((6, 4, 3, 3), (0, 2, 3)),
        ((11,), ())]


def _metric(shape, zeros=False):
    """d > 0 spread over three orders of magnitude (Adam's preconditioner varies that much), a
    few entries at the smallest value (v_hat = 0: d = eps/lr); with ``zeros``, some d = 0."""
    d = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(math.log(0.1), math.log(100)))
    d.view(-1)[::7] = 0.1
    if zeros:
        d.view(-1)[3::11] = 0.0
    return d


def _rows(t, dim):
    dims = reference._reduced(t, dim)
    return reference._as_groups(t, dims), dims


def _prox(z, d, dim, **lams):
    x = z.clone()
    reference.metric_prox_(x, d, dim=dim, **lams)
    return x


@pytest.mark.parametrize("shape,dim", DIMS, ids=str)
def test_kkt_l1(shape, dim):
    z, d = torch.randn(shape, dtype=torch.float64), _metric(shape, zeros=True)
    lam = 0.7
    x = _prox(z, d, dim, lam_l1=lam)
    on = x != 0
    # moved: d (x - z) + lam sign(x) = 0; left at 0: |d z| <= lam
    torch.testing.assert_close((d * (x - z) + lam * x.sign())[on], torch.zeros_like(z)[on])
    assert bool(((d * z).abs()[~on] <= lam + 1e-12).all())
    assert bool((x[d == 0] == 0).all())


@pytest.mark.parametrize("shape,dim", DIMS, ids=str)
@pytest.mark.parametrize("lam_l1", [0.0, 0.4])
def test_kkt_group_and_sparse_group(shape, dim, lam_l1):
    """0 in D(x - z) + lam_l1 d|x| + t d||x_g||: on kept groups the gradient condition holds
    elementwise; on zero groups ||soft(D z, lam_l1)|| <= t; both kinds occur."""
    z, d = torch.randn(shape, dtype=torch.float64), _metric(shape)
    zr, dims = _rows(z, dim)
    dr = _rows(d, dim)[0]
    c = math.sqrt(zr.shape[1])
    # t at the median group's ||soft(D z, lam_l1)||: some groups kept, some removed
    t = float(torch.linalg.vector_norm(reference.shrink_magnitude(dr * zr, lam_l1), dim=1)
              .median())
    x = _prox(z, d, dim, lam_l1=lam_l1, lam_group=t / c)
    kept = metric_group_kkt(z, d, x, dims, lam_l1, t)
    if zr.shape[0] > 2:
        assert 0 < kept < zr.shape[0], "the sample should keep some groups only"


@pytest.mark.parametrize("shape,dim", DIMS, ids=str)
def test_kkt_exclusive(shape, dim):
    """d_i (x_i - z_i) + lam S sign(x_i) = 0 where x_i != 0, |d_i z_i| <= lam S where x_i = 0,
    S = ||x_g||_1."""
    z, d = torch.randn(shape, dtype=torch.float64), _metric(shape, zeros=True)
    lam = 0.3
    x = _prox(z, d, dim, lam_exclusive=lam)
    metric_exclusive_kkt(z, d, x, _rows(z, dim)[1], lam)


def test_exclusive_bound_and_cges_composition():
    z, d = torch.randn(8, 12, dtype=torch.float64), _metric((8, 12))
    bound = _prox(z, d, 1, lam_exclusive=0.05, exact=False)
    want = reference.shrink_magnitude(z, 0.05 * z.abs().sum(1, keepdim=True) / d)
    torch.testing.assert_close(bound, want)
    both = _prox(z, d, 1, lam_group=0.2, lam_exclusive=0.05)
    steps = _prox(_prox(z, d, 1, lam_group=0.2), d, 1, lam_exclusive=0.05)
    torch.testing.assert_close(both, steps)


@pytest.mark.parametrize("shape,dim", DIMS, ids=str)
def test_constant_metric_is_the_euclidean_step(shape, dim):
    """d = 1/lr everywhere: the Euclidean step with thresholds lr * lam."""
    lr = 0.05
    z = torch.randn(shape, dtype=torch.float64)
    d = torch.full(shape, 1 / lr, dtype=torch.float64)
    lams = dict(lam_l1=0.3, lam_group=2.0, lam_exclusive=1.5)
    got = _prox(z, d, dim, **lams)
    want = z.clone()
    reference.foreach_prox_([want], dim=dim, **{k: lr * v for k, v in lams.items()})
    torch.testing.assert_close(got, want)


def test_edge_cases():
    z = torch.randn(6, 10, dtype=torch.float64)
    z[1] = 0.0
    z[2, 3] = float("nan")
    z[3, 4] = float("inf")
    d = _metric((6, 10))
    before = z.clone()
    for lams in (dict(), dict(lam_l1=0.0, lam_group=0.0)):  # every lam 0: bit-identical
        x = _prox(z, d, 1, **lams)
        assert torch.equal(x.view(torch.int64), before.view(torch.int64))
    for lams in (dict(lam_group=0.3), dict(lam_exclusive=0.2), dict(lam_l1=0.1, lam_group=0.3)):
        x = _prox(z, d, 1, **lams)
        assert bool((x[1] == 0).all())                    # a zero group stays zero
        assert bool(x[2].isnan().all())                   # a NaN group becomes NaN
        if "lam_l1" not in lams:
            assert torch.equal(x[3], z[3])                # an infinite group keeps its values
        assert not x[[0, 4, 5]].isnan().any()
    huge = _prox(z, d, 1, lam_group=1e300)
    assert bool((huge[[0, 1, 4, 5]] == 0).all()) and not huge[[0, 4, 5]].isnan().any()
    with pytest.raises(ValueError, match="metric_prox_: d must be finite"):
        bad = d.clone()
        bad[0, 0] = -1.0
        reference.metric_prox_(z.clone(), bad, lam_group=0.1)
    x = z.clone()
    with pytest.raises(ValueError, match="metric_prox_: d has shape"):
        reference.metric_prox_(x, d[:, :3], lam_group=0.1)
    assert torch.equal(x.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("opt_name,kwargs", [
    ("Adam", {}), ("AdamW", {"weight_decay": 0.1}), ("Adam", {"amsgrad": True}),
    ("AdamW", {"betas": (0.8, 0.95), "eps": 1e-6}),
])
def test_adam_metric_is_the_steps_preconditioner(opt_name, kwargs):
    """After a few Adam/AdamW steps, the last step's move (less AdamW's decay) is
    -m_hat / d with d from the optimizer's state: d is the metric the step used."""
    torch.manual_seed(torch.initial_seed() % 2 ** 31)
    p = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    lr = 0.01
    opt = getattr(torch.optim, opt_name)([p], lr=lr, **kwargs)
    group = opt.param_groups[0]
    for _ in range(3):
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        opt.step()
    state = opt.state[p]
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    d = reference.adam_metric(v, step, beta2, group["eps"], lr)
    m_hat = state["exp_avg"] / (1 - beta1 ** step)
    decayed = before * (1 - lr * group["weight_decay"]) if opt_name == "AdamW" else before
    torch.testing.assert_close(p.detach() - decayed, -m_hat / d)


# -- the fused op (foreach_metric_prox_: C++ on the CPU) against the reference -----------------

from helpers import DTYPES, TOLERANCES, random_moment as _moments  # noqa: E402

OP = torch.ops.fastprox.foreach_metric_prox_
STEPS = {"l1": (0.02, 0, 0), "group": (0, 0.5, 0), "sgl": (0.01, 0.5, 0),
         "excl": (0, 0, 0.02), "excl-bound": (0, 0, 0.002), "cges": (0, 0.5, 0.02),
         "all": (0.01, 0.3, 0.01)}


def _call(fn, weights, moments, steps, dims, exact=True, metric=(1 / (1 - 0.999 ** 10), 1e-8,
                                                                   1e-3)):
    n = len(weights)
    lams = torch.tensor([steps] * n if isinstance(steps, tuple) else steps, dtype=torch.float64)
    fn(weights, moments, lams, torch.tensor([metric] * n, dtype=torch.float64),
       [d for ds in dims for d in ds], [len(ds) for ds in dims], [True] * n, [exact] * n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", list(STEPS))
def test_op_matches_reference(step, dtype):
    """Every layout (and a transposed and a strided view) in one call."""
    weights, moments, dims = [], [], []
    for shape, dim in DIMS + [((12, 22), 0)]:
        weights.append(torch.randn(shape).mul_(0.05).to(dtype))
        moments.append(_moments(shape))
        dims.append(list(dim) if isinstance(dim, tuple) else [dim])
    weights.append(torch.randn(22, 12).mul_(0.05).to(dtype).t())
    moments.append(_moments((12, 22)))
    dims.append([1])
    base = torch.randn(10, 30).mul_(0.05).to(dtype)
    weights.append(base[:, ::3])
    moments.append(_moments((10, 10)))
    dims.append([0])
    exact = step != "excl-bound"
    mine = [w.clone() for w in weights[:-1]] + [base.clone()[:, ::3]]
    ref = [w.clone() for w in weights]
    _call(OP, mine, moments, STEPS[step], dims, exact)
    _call(reference.foreach_metric_prox_op, ref, moments, STEPS[step], dims, exact)
    tol = TOLERANCES[dtype]
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=max(tol["rtol"], 1e-5), atol=max(tol["atol"], 1e-6))
    changed = sum(int((a != w).sum()) for a, w in zip(mine, weights))
    assert changed > 0
    if STEPS[step][1] > 0:  # the sample removes some groups of the first weight, not all
        rows = (mine[0] == 0).all(dim=1)
        assert 0 < int(rows.sum()) < rows.numel()


@pytest.mark.parametrize("moment_dtype", [None, torch.float64], ids=["like-w", "fp64-v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", ["l1", "group", "sgl"])
def test_op_column_groups(step, dtype, moment_dtype):
    """Groups side by side in every row (columns of a Linear, a batch of them, input channels of
    a conv with their kernel window), as many as fill several blocks and a partial one, with a
    NaN, an infinite, a zero and a zero-metric group among them: against the reference."""
    # (shape, dim, where group j is: the index of its elements)
    cases = [((7, 300), [0], lambda j: (slice(None), j)),
             ((3, 37), [0], lambda j: (slice(None), j)),
             ((4, 6, 40), [1], lambda j: (0, slice(None), j)),
             ((9, 70, 1, 1), [0, 2, 3], lambda j: (slice(None), j)),
             ((5, 40, 3, 3), [0, 2, 3], lambda j: (slice(None), j)),
             ((3, 30, 2, 7), [0, 2], lambda j: (slice(None), j))]
    weights, moments, dims = [], [], []
    for shape, dim, group in cases:
        w = torch.randn(shape).mul_(0.05)
        w[group(3)] = 0.0
        w[group(5)][2] = float("nan")
        w[group(17)][1] = float("-inf")
        weights.append(w.to(dtype))
        v = _moments(shape, moment_dtype or dtype)
        v[group(11)] = 0
        moments.append(v)
        dims.append(dim)
    mine = [w.clone() for w in weights]
    ref = [w.clone() for w in weights]
    # eps = 0: the column of v = 0 has d = 0 (costs nothing to move: set to 0)
    metric = (1 / (1 - 0.999 ** 10), 0.0, 1e-3)
    _call(OP, mine, moments, STEPS[step], dims, metric=metric)
    _call(reference.foreach_metric_prox_op, ref, moments, STEPS[step], dims, metric=metric)
    tol = TOLERANCES[dtype]
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=max(tol["rtol"], 1e-5),
                                   atol=max(tol["atol"], 1e-6))
    first = mine[0]
    assert bool((first[:, 3] == 0).all()) and bool((first[:, 11] == 0).all())
    if STEPS[step][1] > 0:
        assert bool(first[:, 5].isnan().all())
        if STEPS[step][0] == 0:  # an infinite group keeps its values
            assert torch.equal(first[:, 17], weights[0][:, 17])
        kept = (first != 0).any(dim=0)
        assert 0 < int(kept.sum()) < kept.numel() - 2


def test_op_edge_cases_and_bad_input():
    w = torch.randn(6, 10) * 0.05
    w[1] = 0
    w[2, 3] = float("nan")
    w[3, 4] = float("inf")
    v = _moments((6, 10))
    before = w.clone()
    x = w.clone()
    _call(OP, [x], [v], (0.0, 0.0, 0.0), [[1]])  # every lam 0: bit-identical
    assert torch.equal(x.view(torch.int32), before.view(torch.int32))
    for steps in ((0, 0.05, 0), (0, 0, 0.02), (0, 0.05, 0.02)):
        x, ref = w.clone(), w.clone()
        _call(OP, [x], [v], steps, [[1]])
        _call(reference.foreach_metric_prox_op, [ref], [v], steps, [[1]])
        assert bool((x[1] == 0).all()) and bool(x[2].isnan().all())
        assert torch.equal(x[3], w[3])
        torch.testing.assert_close(x, ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    x = w.clone()
    _call(OP, [x], [v], (0, 1e30, 0), [[1]])  # huge: every finite group removed, no NaN
    assert bool((x[[0, 1, 4, 5]] == 0).all())
    empty = torch.empty(0, 4)
    _call(OP, [empty], [torch.empty(0, 4)], (0.1, 0.1, 0.1), [[1]])
    for bad, words in (
            (lambda: _call(OP, [x], [v[:, :3]], (0, 0.1, 0), [[1]]), "moments\\[0\\] has shape"),
            (lambda: _call(OP, [x], [v], (0, -0.1, 0), [[1]]), "lams\\[0\\]"),
            (lambda: _call(OP, [x], [v], (0, 0.1, 0), [[1]], metric=(1.0, 1e-8, 0.0)),
             "metric\\[0\\]"),
            (lambda: _call(OP, [x, x[:2]], [v, v[:2]], (0, 0.1, 0), [[1], [1]]),
             "share memory")):
        snapshot = x.clone()
        with pytest.raises(ValueError, match=words):
            bad()
        assert torch.equal(x.nan_to_num(), snapshot.nan_to_num())


def test_op_deterministic_across_threads_and_opcheck():
    w = torch.randn(64, 300) * 0.05
    v = _moments((64, 300))
    out = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            x = w.clone()
            _call(OP, [x], [v], STEPS["all"], [[0]])
            out.append(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])
    lams = torch.tensor([STEPS["all"]], dtype=torch.float64)
    metric = torch.tensor([(1.0, 1e-8, 1e-3)], dtype=torch.float64)
    torch.library.opcheck(OP, ([w.clone()], [v], lams, metric, [1], [1], [True], [True]))


def test_op_extreme_metric_spread():
    """d over 15 orders of magnitude and a tiny t: F(theta_L) ~ 1e27 and its slope beyond
    float32's range; the op's sums (P, Q: at most ||z||^2) stay finite and it matches the
    reference."""
    w = torch.full((3, 40), 10.0)
    w[:, 0] = 1e-12
    w[1] *= -1
    d = torch.full((3, 40), 1e-9)
    d[:, 0] = 1e6
    x, ref = w.clone(), w.clone()
    _call(OP, [x], [d * d], (0, 1e-22, 0), [[1]], metric=(1.0, 0.0, 1.0))
    _call(reference.foreach_metric_prox_op, [ref], [d * d], (0, 1e-22, 0), [[1]],
          metric=(1.0, 0.0, 1.0))
    assert not x.isnan().any()
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
