"""The metric step's Triton kernel (foreach_metric_prox_ on CUDA: kernels/metric_prox.py) against
the float64 reference and against the optimality conditions in the metric diag(d), on every
layout, dtype and path of the kernel (whole group in registers, looped sweeps), with edge cases,
moments laid out unlike their weights, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fastprox
from fastprox import reference
from helpers import (DTYPES, TOLERANCES, metric_exclusive_kkt, metric_group_kkt,
                     random_moment)
from kernel_calls import DEVICE, INTERPRET, on_triton_paths
from layouts import LAYOUTS

from fastprox.kernels import launch, metric_prox, tiles
from fastprox.kernels.tables import Tables

pytestmark = pytest.mark.usefixtures("backend")
OP = torch.ops.fastprox.foreach_metric_prox_  # through the dispatcher: the backend under test

STEPS = {"l1": (0.02, 0, 0), "group": (0, 0.5, 0), "sgl": (0.01, 0.5, 0),
         "excl": (0, 0, 0.02), "excl-bound": (0, 0, 0.002), "cges": (0, 0.5, 0.02),
         "all": (0.01, 0.3, 0.01)}
METRIC = (1 / (1 - 0.999 ** 10), 1e-8, 1e-3)  # (s, eps, lr) of Adam's 10th step


@pytest.fixture(params=["tile", "looped"])
def path(request, monkeypatch):
    """Forces the looped sweeps on small shapes by shrinking the tile: groups of more than 32
    elements are swept (in sub-tiles of 8), smaller ones stay in one tile (both in one
    launch). Of the Triton kernels: the other backends run the tile case alone."""
    if request.param == "looped" and not on_triton_paths(request):
        pytest.skip("an engine path of the Triton kernels")
    if request.param == "looped":
        monkeypatch.setattr(tiles, "ONE_TILE_ELEMS", 64)
        monkeypatch.setattr(tiles, "TILE_ELEMS", 32)
    return request.param


def _dims(dim):
    return list(dim) if isinstance(dim, tuple) else [dim]


def _call(fn, weights, moments, steps, dims, exact=True, metric=METRIC, size_weighted=True):
    n = len(weights)
    lams = torch.tensor([steps] * n if isinstance(steps, tuple) else steps, dtype=torch.float64)
    fn(weights, moments, lams, torch.tensor([metric] * n, dtype=torch.float64),
       [d for ds in dims for d in ds], [len(ds) for ds in dims], [size_weighted] * n,
       [exact] * n)


def _reference(weights, moments, steps, dims, exact=True, metric=METRIC, size_weighted=True):
    """The reference on CPU copies, in the weights' dtypes."""
    out = [w.detach().to("cpu").clone() for w in weights]
    _call(reference.foreach_metric_prox_op, out, [v.to("cpu") for v in moments], steps, dims,
          exact, metric, size_weighted)
    return out


def _close(got, want, dtype, msg=""):
    tol = TOLERANCES[dtype]
    scale = want.abs().nan_to_num(posinf=0).max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.to("cpu", torch.float64), want.to(torch.float64),
                               rtol=max(tol["rtol"], 1e-5 if dtype == torch.float32 else 0),
                               atol=max(tol["atol"], 1e-6 if dtype == torch.float32 else 0)
                               * max(scale, 1.0), equal_nan=True, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(step, dtype, path):
    """Every kernel-test layout, a transposed and a strided view, in one call (one bucket per
    tile shape and dtype). Under the interpreter, where the looped sweeps are slow: those in
    float32 for every step and in float64 for two."""
    if INTERPRET and path == "looped" and (
            dtype in (torch.float16, torch.bfloat16) or
            dtype == torch.float64 and step not in ("all", "excl-bound")):
        pytest.skip("interpreter: 16-bit weights differ from float32 in their loads and stores "
                    "only, which the tile path covers")
    weights, moments, dims = [], [], []
    for shape, dim in LAYOUTS:
        weights.append((torch.randn(shape) * 0.05).to(dtype).to(DEVICE))
        moments.append(random_moment(shape).to(DEVICE))
        dims.append(_dims(dim))
    weights.append((torch.randn(22, 12) * 0.05).to(dtype).to(DEVICE).t())
    moments.append(random_moment((12, 22)).to(DEVICE))
    dims.append([1])
    base = (torch.randn(10, 30) * 0.05).to(dtype).to(DEVICE)
    weights.append(base[:, ::3])
    moments.append(random_moment((10, 10)).to(DEVICE))
    dims.append([0])
    exact = step != "excl-bound"
    want = _reference(weights, moments, STEPS[step], dims, exact)
    before = [w.clone() for w in weights]
    _call(OP, weights, moments, STEPS[step], dims, exact)
    for k, (w, r) in enumerate(zip(weights, want)):
        _close(w, r, dtype, f"{step} weight {k} {tuple(w.shape)} dims={dims[k]}")
    assert sum(int((w != b).sum()) for w, b in zip(weights, before)) > 0
    if STEPS[step][1] > 0:  # some groups of the first weight removed, not all
        rows = (weights[0] == 0).all(dim=1)
        assert 0 < int(rows.sum()) < rows.numel()


def _d(v, metric=METRIC):
    s, eps, lr = metric
    return ((v.to(torch.float64) * s).sqrt() + eps) / lr


@pytest.mark.parametrize("shape,dim", [((9, 40), 1), ((40, 9), 0), ((6, 8, 3, 3), (1, 2, 3))],
                         ids=str)
@pytest.mark.parametrize("lam_l1", [0.0, 0.3])
def test_kkt_group(shape, dim, lam_l1, path):
    """No reference: 0 in D(x - z) + lam_l1 d|x| + t d||x_g|| for the kernel's float64 result.
    Kept groups satisfy the gradient condition elementwise, removed ones ||soft(D z, l1)|| <= t,
    and both kinds occur."""
    z = (torch.randn(shape, dtype=torch.float64) * 0.05).to(DEVICE)
    v = random_moment(shape).to(torch.float64).to(DEVICE)
    d = _d(v)
    dims = _dims(dim)
    zr, dr = (reference._as_groups(t.cpu(), dims) for t in (z, d))
    c = math.sqrt(zr.shape[1])
    t = float(torch.linalg.vector_norm(reference.shrink_magnitude(dr * zr, lam_l1), dim=1)
              .median())
    x = z.clone()
    fastprox.foreach_metric_prox_([x], [v], lr=METRIC[2], eps=METRIC[1], beta2=0.999, step=10,
                                  lam_l1=lam_l1, lam_group=t / c, dim=dim)
    kept = metric_group_kkt(z, d, x, dims, lam_l1, t, atol=1e-8 * max(t, 1))
    assert 0 < kept < zr.shape[0]


@pytest.mark.parametrize("shape,dim", [((7, 50), 1), ((50, 7), 0)], ids=str)
def test_kkt_exclusive(shape, dim, path):
    """0 in d_i (x_i - z_i) + lam S d|x_i|, S = ||x_g||_1: moved elements satisfy it exactly,
    zeroed ones have d_i |z_i| <= lam S."""
    z = (torch.randn(shape, dtype=torch.float64) * 0.05).to(DEVICE)
    v = random_moment(shape).to(torch.float64).to(DEVICE)
    d = _d(v)
    lam = 0.05
    x = z.clone()
    fastprox.foreach_metric_prox_([x], [v], lr=METRIC[2], eps=METRIC[1], beta2=0.999, step=10,
                                  lam_exclusive=lam, dim=dim)
    on = metric_exclusive_kkt(z, d, x, [dim], lam)
    assert 0 < on < x.numel()


@pytest.mark.parametrize("step", ["group", "excl", "cges", "all"])
def test_edge_values(step, path):
    """A zero group stays zero, a NaN group becomes NaN, an infinite one keeps its values, tiny
    values; v = 0 with eps = 0 (d = 0: the element goes to 0) and with eps > 0."""
    w = (torch.randn(7, 40) * 0.05).to(DEVICE)
    w[1] = 0
    w[2, 3] = math.nan
    w[3, 5] = math.inf
    w[4] = 1e-30
    v = random_moment((7, 40)).to(DEVICE)
    v[5, ::3] = 0
    for metric in (METRIC, (METRIC[0], 0.0, METRIC[2])):
        x = w.clone()
        want = _reference([w], [v], STEPS[step], [[1]], metric=metric)[0]
        _call(OP, [x], [v], STEPS[step], [[1]], metric=metric)
        _close(x, want, torch.float32, f"{step} eps={metric[1]}")
        assert bool((x[1] == 0).all()) and not x[1].isnan().any()
        assert bool(x[2].isnan().all())
        if STEPS[step][0] == 0:  # (the soft threshold moves the finite values of that group)
            assert torch.equal(x[3], w[3])
        if metric[1] == 0:  # d = 0 where v = 0: nothing holds those elements in place
            assert bool((x[5, ::3] == 0).all())


def test_l1_alone_is_elementwise_and_zero_d():
    w = (torch.randn(5, 9) * 0.05).to(DEVICE)
    w[0, 0] = math.nan
    w[1, 2] = math.inf  # (a moment of 0 at [1, 1]: d = 0 there, which sends even inf to 0)
    v = random_moment((5, 9)).to(DEVICE)
    v[2] = 0
    x = w.clone()
    metric = (1.0, 0.0, 1e-3)
    want = _reference([w], [v], STEPS["l1"], [[1]], metric=metric)[0]
    _call(OP, [x], [v], STEPS["l1"], [[1]], metric=metric)
    _close(x, want, torch.float32, "l1")
    assert x[0, 0].isnan() and not x[0, 1:].isnan().any() and x[1, 2] == math.inf
    assert bool((x[2] == 0).all())


def test_zero_lams_are_bit_identical():
    w = (torch.randn(9, 33) * 0.05).to(torch.bfloat16).to(DEVICE)
    w[1, 1] = math.nan
    before = w.clone()
    _call(OP, [w], [random_moment((9, 33)).to(DEVICE)], (0.0, 0.0, 0.0),
          [[1]])
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))


def test_huge_lams_and_sizes():
    """Huge thresholds: the soft threshold and the group step remove everything; the exclusive
    step alone leaves values of order 1/lam (float32: the rounding of |y| - tau), never NaN."""
    for steps in ((0, 1e30, 0), (1e30, 1e30, 1e30), (0, 0, 1e30)):
        w = (torch.randn(5, 17) * 0.05).to(DEVICE)
        v = random_moment((5, 17)).to(DEVICE)
        want = _reference([w], [v], steps, [[1]])[0]
        _call(OP, [w], [v], steps, [[1]])
        assert not w.isnan().any()
        _close(w, want, torch.float32, f"{steps}")
        if steps[0] or steps[1]:
            assert bool((w == 0).all())
    for shape in ((0, 5), (5, 0), (1, 1), (1,)):
        w = torch.randn(shape, device=DEVICE)
        want = _reference([w], [random_moment(shape).to(DEVICE)], STEPS["all"],
                          [[0]], metric=METRIC)[0]
        _call(OP, [w], [random_moment(shape).to(DEVICE)],
              STEPS["all"], [[0]])
        assert w.shape == want.shape


def test_extreme_metric_spread(path):
    """d over 15 orders of magnitude, a tiny t: in the group below, the large-d element sets
    theta_L ~ 1e-12 and the others give F(theta_L) ~ 1e27, whose F^(3/2) overflows float32. The
    Newton step must stay finite: no NaN, the reference's result."""
    w = torch.full((3, 40), 10.0)
    w[:, 0] = 1e-12
    d = torch.full((3, 40), 1e-9)
    d[:, 0] = 1e6
    w[1] *= -1
    metric = (1.0, 0.0, 1.0)  # d = sqrt(v)
    v = (d * d).to(DEVICE)
    w = w.to(DEVICE)
    want = _reference([w], [v], (0, 1e-22, 0), [[1]], metric=metric)[0]
    _call(OP, [w], [v], (0, 1e-22, 0), [[1]], metric=metric)
    assert not w.isnan().any()
    _close(w, want, torch.float32, "spread")


def test_moments_laid_out_unlike_their_weights(path):
    """A transposed moment, a moment of another dtype (float32 for a bfloat16 weight), a weight
    that is a strided view (elements outside it untouched), a layout copied to kept-first."""
    base = (torch.randn(12, 22) * 0.05).to(DEVICE)
    outside_before = base.clone()
    cases = [
        ((torch.randn(14, 9) * 0.05).to(DEVICE), random_moment((9, 14)).to(DEVICE).t(), [0]),
        ((torch.randn(14, 9) * 0.05).to(torch.bfloat16).to(DEVICE),
         random_moment((14, 9)).to(DEVICE), [1]),
        (base[:, ::2], random_moment((12, 11)).to(DEVICE), [0]),
        ((torch.randn(3, 4, 5, 6) * 0.05).to(DEVICE), random_moment((3, 4, 5, 6)).to(DEVICE),
         [1, 3]),
    ]
    weights = [c[0] for c in cases]
    moments = [c[1] for c in cases]
    dims = [c[2] for c in cases]
    want = _reference(weights, moments, STEPS["all"], dims)
    _call(OP, weights, moments, STEPS["all"], dims)
    for w, r in zip(weights, want):
        _close(w, r, w.dtype, f"{tuple(w.shape)}")
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, ::2] = False
    assert torch.equal(base[mask], outside_before[mask])


def test_public_api_on_an_adamw_step():
    """fastprox.foreach_metric_prox_ on an AdamW optimizer's state, through the kernels, against
    the reference."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(16, 24) * 0.1).to(DEVICE)),
              torch.nn.Parameter((torch.randn(8, 4, 3, 3) * 0.1).to(DEVICE))]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum((p * p).sum() + p.sum() for p in params).backward()
        opt.step()
    with torch.no_grad():
        moments = [opt.state[p]["exp_avg_sq"] for p in params]
        step = int(opt.state[params[0]]["step"])
        want = [p.detach().to("cpu", torch.float64) for p in params]
        ds = [reference.adam_metric(m.cpu(), step, 0.999, 1e-8, 1e-2) for m in moments]
        for w, d, dim in zip(want, ds, [1, (1, 2, 3)]):
            reference.metric_prox_(w, d, lam_l1=1e-3, lam_group=5e-3, dim=dim)
        fastprox.foreach_metric_prox_(params, moments, lr=1e-2, lam_l1=1e-3, lam_group=5e-3,
                                      dim=[1, (1, 2, 3)], step=step)
    for p, w in zip(params, want):
        _close(p.detach(), w, torch.float32, "adamw")


def test_deterministic():
    w = (torch.randn(64, 300) * 0.05).to(DEVICE)
    v = random_moment((64, 300)).to(DEVICE)
    out = []
    for _ in range(2):
        x = w.clone()
        _call(OP, [x], [v], STEPS["all"], [[0]])
        out.append(x)
    assert torch.equal(out[0], out[1])


def _damaged(v, bad):
    v = v.clone()
    v[2, 7] = bad
    return v


def test_thresholds_beyond_float32(path):
    """lam_l1 / d and t = lam_group * c beyond float32: an infinite element stays infinite (its
    group keeps its values), finite groups go, no NaN; as the float64 reference."""
    w = (torch.randn(6, 40) * 0.05).to(DEVICE)
    w[3, 5] = math.inf
    v = random_moment((6, 40)).to(DEVICE)
    for steps in ((1e39, 0, 0), (0, 1e39, 0), (1e39, 1e39, 0), (0, 1e39, 1e39)):
        x = w.clone()
        want = _reference([w], [v], steps, [[1]])[0]
        _call(OP, [x], [v], steps, [[1]])
        assert not x.isnan().any() and x[3, 5] == math.inf, steps
        _close(x, want, torch.float32, f"{steps}")


def test_bad_input_leaves_the_weights(backend):
    if backend == "reference":
        pytest.skip("the oracle checks the values it computes with, not every argument of the op")
    w = (torch.randn(6, 10) * 0.05).to(DEVICE)
    v = random_moment((6, 10)).to(DEVICE)
    before = w.clone()
    op = OP
    for bad, words in (
            (lambda: _call(op, [w], [v[:, :3]], (0, 0.1, 0), [[1]]), r"moments\[0\] has shape"),
            (lambda: _call(op, [w], [v.to(torch.int32)], (0, 0.1, 0), [[1]]),
             r"moments\[0\] must be a floating tensor"),
            (lambda: _call(op, [w], [v], (0, -0.1, 0), [[1]]), r"lams\[0\]"),
            (lambda: _call(op, [w], [v], (0, math.nan, 0), [[1]]), r"lams\[0\]"),
            (lambda: _call(op, [w], [v], (0, 0.1, 0), [[1]], metric=(1.0, 1e-8, 0.0)),
             r"metric\[0\]"),
            (lambda: _call(op, [w], [v], (0, 0.1, 0), [[1]], metric=(1.0, -1.0, 1e-3)),
             r"metric\[0\]"),
            (lambda: _call(op, [w, w[:2]], [v, v[:2]], (0, 0.1, 0), [[1], [1]]),
             "share memory"),
            (lambda: _call(op, [w], [v], (0, 0.1, 0), [[4]]), "out of range"),
            *[(lambda bad=bad: _call(op, [w], [_damaged(v, bad)], (0, 0.1, 0), [[1]]),
               r"moments\[0\] has negative, NaN or infinite entries")
              for bad in (-1e-9, math.nan, math.inf)],
            (lambda: _call(op, [w], [w], (0, 0.1, 0), [[1]]),
             r"moments\[0\] shares memory with weights\[0\]"),
            (lambda: op([w], [_damaged(v, math.nan)], torch.tensor([[0, 0.1, 0]],
                        dtype=torch.float64), torch.tensor([METRIC], dtype=torch.float64), [1],
                        [1], [True], [True], ["exp_avg_sqs[3]"]),
             r"exp_avg_sqs\[3\] has negative")):
        with pytest.raises(ValueError, match=words):
            bad()
        assert torch.equal(w, before)
    with pytest.raises(ValueError, match="foreach_metric_prox_: lams must be a float64"):
        op([w], [v], torch.zeros(3), torch.zeros(1, 3, dtype=torch.float64), [1], [1], [True],
           [True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_one_bad_entry_of_a_moment_anywhere_is_found(backend, dtype):
    """The moment check reads every entry: one bad entry (negative, NaN, inf) at the start, in
    each of the unrolled chains, in the tail or at the end of moments of odd sizes refuses the
    step and leaves the weight as it was; -0.0 and the largest finite value pass."""
    if backend == "reference":
        pytest.skip("the oracle checks the values it computes with, not every argument of the op")
    for n in (1, 63, 64 * 3 + 17, 40003):
        w = (torch.randn(n) * 0.05).to(DEVICE)
        v = random_moment((n,)).to(dtype).to(DEVICE)
        before = w.clone()
        good = v.clone()
        good[0] = -0.0
        good[-1] = torch.finfo(dtype).max
        _call(OP, [w.clone().unsqueeze(0)], [good.unsqueeze(0)], (0, 0.1, 0), [[1]])
        positions = sorted({0, min(17, n - 1), min(33, n - 1), min(50, n - 1), n // 2,
                            max(n - 5, 0), n - 1})
        for i in positions:
            for bad in (-1e-3, math.nan, math.inf):
                damaged = v.clone()
                damaged[i] = bad
                with pytest.raises(ValueError, match=r"moments\[0\] has negative, NaN or "):
                    _call(OP, [w.unsqueeze(0)], [damaged.unsqueeze(0)], (0, 0.1, 0), [[1]])
                assert torch.equal(w, before), (n, i, bad)


@pytest.mark.triton_only
def test_launches(path, monkeypatch):
    """The path fixture reaches the paths it names, and a model's list is a few launches."""

    seen = []
    kernel = launch.KERNELS["metric_kernel"]

    class Counting:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["FIT"])
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setitem(launch.KERNELS, "metric_kernel", Counting())
    w = (torch.randn(37, 7) * 0.05).to(DEVICE)
    _call(OP, [w], [random_moment((37, 7)).to(DEVICE)], STEPS["cges"],
          [[0]])
    assert seen == ([1] if path == "tile" else [2])


@pytest.mark.triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_model_in_few_launches(dtype):
    from model_shapes import gpt2_small_weights, resnet50_weights

    def count(shapes):
        entries = []
        for shape, dim in shapes:
            w = torch.empty(shape, dtype=dtype, device="meta")
            dims = sorted(d % w.dim() for d in ((dim,) if isinstance(dim, int) else dim))
            entries.append((w, torch.empty_like(w), dims, True, True))
        table = torch.zeros(len(entries), 3, dtype=torch.float64)
        plans = metric_prox.plan_metric_step(entries, [(False, True, False)] * len(entries),
                                             table, table, 132, Tables("cpu", upload=False))
        return sum(len(launches) for _, _, launches, _ in plans)

    assert count(resnet50_weights()) <= 4
    assert count(gpt2_small_weights()) <= 2


def test_coupled_groups_of_different_sizes(backend):
    """coupled_metric_prox_ on every backend (groups of different sizes: each its own
    threshold)."""
    from fastprox.metric import coupled_metric_prox_
    from test_metric_training import coupled_sizes_case

    groups, ds, members, want, lams = coupled_sizes_case(DEVICE)
    coupled_metric_prox_(groups, ds, **lams)
    for got, w in zip(members, want):
        torch.testing.assert_close(got.cpu(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("special", [False, True], ids=["plain", "zero-nan-inf-d0"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_coupled_sets_of_every_layout(backend, dtype, special):
    """Rows, columns, a bias, conv input channels and a strided view in one set, in the metric,
    against the float64 oracle (per group, the plain reference step on its joined slices)."""
    from coupled_metric_cases import oracle, random_set, tolerance
    from fastprox.metric import coupled_metric_prox_

    lams = dict(lam_l1=0.02, lam_group=0.25, lam_exclusive=0.03)
    groups, members, ds = random_set(dtype, DEVICE, special=special)
    want = oracle(groups, ds, **lams)
    coupled_metric_prox_(groups, ds, **lams)
    for got, w in zip(members, want):
        torch.testing.assert_close(got.double().cpu(), w, equal_nan=True, **tolerance(dtype))


def test_moments_checked_by_the_caller(backend):
    """``moments_checked=True`` (the Regularizer's plan checked the values): the same results,
    bit for bit, as the op checking them; where the moments lie is still checked (a moment in a
    weight's memory refused, the weight untouched)."""
    weights = [(torch.randn(6, 10) * 0.05).to(DEVICE), (torch.randn(4, 3, 3) * 0.05).to(DEVICE)]
    moments = [random_moment(w.shape).to(DEVICE) for w in weights]
    lams = torch.tensor([[1e-3, 0.1, 0.0]] * 2, dtype=torch.float64)
    metric = torch.tensor([METRIC] * 2, dtype=torch.float64)
    args = ([0, 1, 2], [1, 2], [True, True], [True, True])
    checked, unchecked = [w.clone() for w in weights], [w.clone() for w in weights]
    OP(checked, moments, lams, metric, *args, None, True)
    OP(unchecked, moments, lams, metric, *args)
    for a, b in zip(checked, unchecked):
        assert torch.equal(a, b)
    assert not torch.equal(checked[0], weights[0])
    w = weights[0]
    before = w.clone()
    with pytest.raises(ValueError, match=r"moments\[0\] shares memory with weights\[0\]"):
        OP([w], [w], lams[:1], metric[:1], [1], [1], [True], [True], None, True)
    assert torch.equal(w, before)
