"""The Triton kernels against the float64 reference: every operator, dtype and layout, each path
of the engine (whole group in registers, looped sweeps, split across programs), edge cases and
bad input. Shapes are small: under the interpreter every program runs in numpy."""

from __future__ import annotations

import math

import pytest
import torch

from fastprox import reference
from helpers import TOLERANCES, random_weight
from kernel_calls import DEVICE, INTERPRET, call, foreach_prox_, group_norms
from layouts import LAYOUTS

from fastprox.kernels import launch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (op, thresholds, kwargs)
OPS = [
    ("group_shrink_", (0.3,), {}),
    ("group_shrink_", (0.9,), dict(size_weighted=False)),
    ("soft_threshold_", (0.5,), {}),
    ("sparse_group_shrink_", (0.2, 0.15), {}),
    ("exclusive_shrink_", (0.1,), {}),
    ("exclusive_shrink_", (0.02,), dict(exact=False)),
    ("cges_shrink_", (0.1, 0.05), {}),
    ("cges_shrink_", (0.5, 0.02), dict(size_weighted=False, exact=False)),
]
GROUPED = [o for o in OPS if o[0] != "soft_threshold_"]
IDS = [f"{o[0]}{'-' + '-'.join(f'{k}={v}' for k, v in o[2].items()) if o[2] else ''}" for o in OPS]
GROUPED_IDS = [i for i, o in zip(IDS, OPS) if o[0] != "soft_threshold_"]

@pytest.fixture(params=["tile", "looped", "split"])
def path(request, monkeypatch):
    """Forces an engine path on small shapes by shrinking its size limits."""
    if request.param != "tile":
        monkeypatch.setattr(launch, "ONE_TILE_ELEMS", 16)
        monkeypatch.setattr(launch, "TILE_ELEMS", 8)
    monkeypatch.setattr(launch, "SPLIT_BELOW_BLOCKS", 10 ** 6 if request.param == "split" else 0)
    return request.param


def _weight(shape, dtype):
    return random_weight(shape, dtype).to(DEVICE)


def _expected(op, weight, lams, dim, kwargs):
    w = weight.detach().to("cpu", torch.float64).clone()
    fn = getattr(reference, op)
    return fn(w, *lams, **kwargs) if op == "soft_threshold_" else fn(w, *lams, dim, **kwargs)


def _check(op, weight, lams, dim=None, **kwargs):
    want = _expected(op, weight, lams, dim, kwargs)
    ptr = weight.data_ptr()
    got = call(op, weight, lams, dim, **kwargs)
    assert got is weight and weight.data_ptr() == ptr
    scale = want.abs().nan_to_num(posinf=0).max().item() if want.numel() else 1.0
    tol = TOLERANCES[weight.dtype]
    torch.testing.assert_close(weight.to("cpu", torch.float64), want, rtol=tol["rtol"],
                               atol=tol["atol"] * max(scale, 1.0), equal_nan=True,
                               msg=lambda m: f"{op} dim={dim} {weight.dtype} "
                                             f"{tuple(weight.shape)}: {m}")


@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=[f"{s}-{d}" for s, d in LAYOUTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_matches_reference(op, lams, kwargs, dtype, shape, dim, path):
    if path == "split" and op in ("exclusive_shrink_", "cges_shrink_") and kwargs.get(
            "exact", True):
        pytest.skip("the exact exclusive threshold never takes the split path")
    _check(op, _weight(shape, dtype), lams, dim, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=[f"{s}-{d}" for s, d in LAYOUTS])
def test_group_norms(shape, dim, dtype, path):
    w = _weight(shape, dtype)
    want = reference.group_norms(w.to("cpu", torch.float64), dim)
    got = group_norms(w, dim)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.to("cpu", torch.float64), want, rtol=tol["rtol"],
                               atol=tol["atol"])


@pytest.mark.parametrize("view", ["t", "every-other-column", "slice"])
@pytest.mark.parametrize("op,lams,kwargs", GROUPED, ids=GROUPED_IDS)
def test_non_contiguous_views(op, lams, kwargs, view, path):
    base = _weight((12, 22), torch.float32)
    before = base.clone()
    w = {"t": base.t(), "every-other-column": base[:, ::2], "slice": base[2:9, 3:17]}[view]
    want = _expected(op, w, lams, 0, kwargs)
    call(op, w, lams, 0, **kwargs)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(w.to("cpu", torch.float64), want, **tol)
    outside = torch.ones_like(base, dtype=torch.bool)
    {"t": lambda m: m.zero_(), "every-other-column": lambda m: m[:, ::2].zero_(),
     "slice": lambda m: m[2:9, 3:17].zero_()}[view](outside)
    assert torch.equal(base[outside], before[outside]), "elements outside the view changed"


@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_edge_values(op, lams, kwargs, path):
    w = _weight((6, 40), torch.float32)
    w[0] = 0                      # a zero group stays zero, never NaN
    w[2, 3] = math.nan            # a NaN group becomes NaN (elementwise for the lasso)
    w[3, 5] = math.inf            # an infinite group keeps its values
    w[4, :] = 1e-30               # tiny values
    before = w.clone()
    _check(op, w, lams, 1, **kwargs)
    assert torch.equal(w[0], torch.zeros_like(w[0])) and not w[0].isnan().any()
    if op != "soft_threshold_":
        assert w[2].isnan().all()
        if op in ("group_shrink_",):
            assert torch.equal(w[3], before[3])


@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_zero_lam_is_bit_identical(op, lams, kwargs):
    w = _weight((9, 33), torch.bfloat16)
    w[1, 1] = math.nan
    before = w.clone()
    call(op, w, tuple(0.0 for _ in lams), 1, **kwargs)
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_huge_lam(op, lams, kwargs):
    w = _weight((5, 17), torch.float32)
    _check(op, w, tuple(1e30 for _ in lams), 1, **kwargs)
    assert not w.isnan().any()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)], ids=str)
@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_empty(op, lams, kwargs, shape):
    w = torch.empty(shape, device=DEVICE)
    call(op, w, lams, 0, **kwargs)
    assert group_norms(w, 0).shape == reference.group_norms(w.cpu(), 0).shape


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("op,lams,kwargs", OPS, ids=IDS)
def test_bad_threshold_leaves_weight(op, lams, kwargs, bad):
    w = _weight((4, 9), torch.float32)
    before = w.clone()
    for k in range(len(lams)):
        args = list(lams)
        args[k] = bad
        with pytest.raises(ValueError, match="finite number >= 0"):
            call(op, w, tuple(args), 1, **kwargs)
        assert torch.equal(w, before)


def test_bad_input_names_the_argument():
    from fastprox import kernels

    w = torch.randn(4, 4, device=DEVICE)
    lam = torch.tensor(0.1)
    with pytest.raises(TypeError, match="weight must be float32"):
        kernels.group_shrink_(w.to(torch.int32), lam, [1], True)
    with pytest.raises(ValueError, match="dim 5 is out of range"):
        kernels.group_shrink_(w, lam, [5], True)
    with pytest.raises(ValueError, match="more than once"):
        kernels.group_shrink_(w, lam, [1, -1], True)
    expanded = torch.randn(4, 1, device=DEVICE).expand(4, 4)
    with pytest.raises(ValueError, match="share memory"):
        kernels.group_shrink_(expanded, lam, [1], True)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        kernels.foreach_prox_([w, w[1:]], torch.zeros(2, 3, dtype=torch.float64) + 0.1,
                              [1, 1], [1, 1], [True, True], [True, True])
    with pytest.raises(ValueError, match=r"lam_group\[1\] must be a finite"):
        kernels.foreach_prox_([w, w.clone()], torch.tensor([[0, 1, 0], [0, -1, 0.]],
                              dtype=torch.float64), [1, 1], [1, 1], [True, True],
                              [True, True])


MIXED = [((7, 37), 1, torch.float32), ((37, 7), 0, torch.float32), ((6, 5, 3, 3), (0, 2, 3),
         torch.bfloat16), ((6, 5, 3, 3), 0, torch.float32), ((40, 3), 0, torch.float16),
         ((3, 4, 5, 6), (1, 3), torch.float64), ((0, 4), 1, torch.float32)]


@pytest.mark.parametrize("steps", ["group", "sgl", "cges", "cges-bound", "all", "l1"])
def test_foreach_matches_reference(steps, path):
    weights = [_weight(s, dt) for s, _, dt in MIXED]
    dims = [d for _, d, _ in MIXED]
    n = len(weights)
    lams = {"group": dict(lam_group=0.3), "sgl": dict(lam_l1=0.1, lam_group=0.2),
            "cges": dict(lam_group=0.2, lam_exclusive=0.05),
            "cges-bound": dict(lam_group=0.2, lam_exclusive=0.01, exact=False),
            "all": dict(lam_l1=0.05, lam_group=[0.1 * (i % 3) for i in range(n)],
                        lam_exclusive=0.03, size_weighted=[i % 2 == 0 for i in range(n)]),
            "l1": dict(lam_l1=0.4)}[steps]
    if path == "split" and steps in ("cges", "all"):
        lams = dict(lams, exact=False)
    copies = [w.to("cpu", torch.float64) for w in weights]
    reference.foreach_prox_(copies, dim=dims, **lams)
    foreach_prox_(weights, dim=dims, **lams)
    for w, want in zip(weights, copies):
        tol = TOLERANCES[w.dtype]
        scale = want.abs().max().item() if want.numel() else 1.0
        torch.testing.assert_close(w.to("cpu", torch.float64), want, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(scale, 1.0), equal_nan=True)


def test_foreach_matches_single_ops():
    """One launch for many weights gives what one call per weight gives, bit for bit."""
    weights = [_weight((9, 13), torch.float32), _weight((13, 9), torch.float32),
               _weight((8, 4, 3, 3), torch.float32)]
    dims = [0, 0, (0, 2, 3)]
    singles = [w.clone() for w in weights]
    foreach_prox_(weights, lam_group=0.2, lam_exclusive=0.05, dim=dims)
    for w, d in zip(singles, dims):
        call("cges_shrink_", w, (0.2, 0.05), d)
    for a, b in zip(weights, singles):
        assert torch.equal(a, b)


def _plan(shapes_dims, dtype, sms=132):
    """The launches foreach_prox_ makes for a group lasso step on a parameter list, on a GPU of
    `sms` SMs: the launcher's own plan, on meta tensors."""
    entries = []
    for shape, dim in shapes_dims:
        w = torch.empty(shape, dtype=dtype, device="meta")
        dims = sorted(d % w.dim() for d in ((dim,) if isinstance(dim, int) else dim))
        entries.append((w, dims, (0.0, 0.1, 0.0), True, True))
    table = torch.zeros(len(entries), 3, dtype=torch.float64)
    flags = [(False, True, False)] * len(entries)
    plans = launch.plan_prox(entries, table, flags, sms, launch.Tables("cpu", upload=False))
    return sum(len(launches) for _, _, launches, _ in plans)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_model_in_few_launches(dtype):
    from model_shapes import gpt2_small_weights, resnet50_weights

    assert _plan(resnet50_weights(), dtype) == 3  # 1x1 convs and fc, 3x3 convs, the 7x7 stem
    assert _plan(gpt2_small_weights(), dtype) == 1


class _Counting:
    def __init__(self, kernel, seen, name):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        self.seen.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("exact", [True, False])
def test_paths_are_taken(path, monkeypatch, exact):
    """The path fixture reaches the kernels it names (the tests above rely on it)."""
    from fastprox.kernels import group_engine as engine

    seen: list = []
    for name in ("prox_kernel", "split_stats_kernel", "split_apply_kernel"):
        monkeypatch.setattr(engine, name, _Counting(getattr(engine, name), seen, name))
    call("cges_shrink_", _weight((37, 7), torch.float32), (0.1, 0.05), 0, exact=exact)
    if path == "split" and not exact:
        assert seen == ["split_stats_kernel", "split_apply_kernel"]
    else:
        assert seen == ["prox_kernel"]
