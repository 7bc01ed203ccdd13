"""The Triton kernels against the float64 reference: every operator of the main suite's table
(tests/helpers.py, from fastprox/operators.py), dtype and layout, each path of the engine (whole
group in registers, looped sweeps, split across programs), edge cases and bad input. Every call
goes through the public API (kernel_calls.py). Shapes are small: under the interpreter every
program runs in numpy."""

from __future__ import annotations

import math

import pytest
import torch

import fastprox
from fastprox import reference
from helpers import DTYPES, OPS, TOLERANCES, assert_matches_reference, random_weight, run
from kernel_calls import DEVICE, on_triton_paths
from layouts import LAYOUTS

from fastprox.kernels import launch, tiles
from fastprox.kernels.tables import Tables

GROUPED = [op for op in OPS if op.grouped]
pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture(params=["tile", "looped", "split"])
def path(request, monkeypatch):
    """Forces an engine path on small shapes by shrinking its size limits (of the Triton
    kernels: the other backends run the tile case alone)."""
    if request.param != "tile" and not on_triton_paths(request):
        pytest.skip("an engine path of the Triton kernels")
    if request.param != "tile":
        monkeypatch.setattr(tiles, "ONE_TILE_ELEMS", 16)
        monkeypatch.setattr(tiles, "TILE_ELEMS", 8)
    monkeypatch.setattr(tiles, "SPLIT_BELOW_BLOCKS", 10 ** 6 if request.param == "split" else 0)
    return request.param


def _weight(shape, dtype):
    return random_weight(shape, dtype).to(DEVICE)


def _exact(op) -> bool:
    return fastprox.operators.BY_NAME[op.name].newton(op.kwargs)


@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=[f"{s}-{d}" for s, d in LAYOUTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_matches_reference(op, dtype, shape, dim, path):
    if path == "split" and _exact(op):
        pytest.skip("the exact exclusive threshold never takes the split path")
    assert_matches_reference(op, _weight(shape, dtype), dim=dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=[f"{s}-{d}" for s, d in LAYOUTS])
def test_group_norms(shape, dim, dtype, path):
    w = _weight(shape, dtype)
    want = reference.group_norms(w.to("cpu", torch.float64), dim)
    got = fastprox.group_norms(w, dim)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.to("cpu", torch.float64), want, rtol=tol["rtol"],
                               atol=tol["atol"])


@pytest.mark.parametrize("view", ["t", "every-other-column", "slice"])
@pytest.mark.parametrize("op", GROUPED, ids=str)
def test_non_contiguous_views(op, view, path):
    base = _weight((12, 22), torch.float32)
    before = base.clone()
    w = {"t": base.t(), "every-other-column": base[:, ::2], "slice": base[2:9, 3:17]}[view]
    assert_matches_reference(op, w, dim=0)
    outside = torch.ones_like(base, dtype=torch.bool)
    {"t": lambda m: m.zero_(), "every-other-column": lambda m: m[:, ::2].zero_(),
     "slice": lambda m: m[2:9, 3:17].zero_()}[view](outside)
    assert torch.equal(base[outside], before[outside]), "elements outside the view changed"


@pytest.mark.parametrize("op", OPS, ids=str)
def test_edge_values(op, path):
    w = _weight((6, 40), torch.float32)
    w[0] = 0                      # a zero group stays zero, never NaN
    w[2, 3] = math.nan            # a NaN group becomes NaN (elementwise for the lasso)
    w[3, 5] = math.inf            # an infinite group keeps its values
    w[4, :] = 1e-30               # tiny values
    before = w.clone()
    assert_matches_reference(op, w, dim=1)
    assert torch.equal(w[0], torch.zeros_like(w[0])) and not w[0].isnan().any()
    if op.grouped:
        assert w[2].isnan().all()
        if op.name == "group_shrink_":
            assert torch.equal(w[3], before[3])


@pytest.mark.parametrize("op", OPS, ids=str)
def test_zero_lam_is_bit_identical(op):
    w = _weight((9, 33), torch.bfloat16)
    w[1, 1] = math.nan
    before = w.clone()
    run(op, w, tuple(0.0 for _ in op.lams), 1)
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_huge_lam(op):
    w = _weight((5, 17), torch.float32)
    assert_matches_reference(op, w, tuple(1e30 for _ in op.lams), 1)
    assert not w.isnan().any()


@pytest.mark.parametrize("op", OPS, ids=str)
def test_thresholds_beyond_float32(op, path):
    """Finite thresholds above float32's range (lam, and lam * sqrt(n)): the real threshold's
    result, as the float64 reference gives it: an infinite group keeps its values, an infinite
    element stays infinite, finite groups go, no NaN (on every path of the engine)."""
    w = _weight((6, 40), torch.float32)
    w[3, 5], w[1, 0] = math.inf, -math.inf
    before = w.clone()
    assert_matches_reference(op, w, tuple(1e39 for _ in op.lams), 1)
    assert not w.isnan().any() and w[3, 5] == math.inf and w[1, 0] == -math.inf
    if op.name in ("group_shrink_", "cges_shrink_"):
        assert torch.equal(w[[1, 3]], before[[1, 3]]) and (w[[0, 2, 4, 5]] == 0).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_empty(op, shape):
    w = torch.empty(shape, device=DEVICE)
    run(op, w, dim=0)
    assert fastprox.group_norms(w, 0).shape == reference.group_norms(w.cpu(), 0).shape


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("tensor", [False, True], ids=["number", "tensor"])
@pytest.mark.parametrize("op", OPS, ids=str)
def test_bad_threshold_leaves_weight(op, bad, tensor):
    """Checked by the kernel entry (thresholds are read there), named as the operator names it."""
    w = _weight((4, 9), torch.float32)
    before = w.clone()
    row = fastprox.operators.BY_NAME[op.name]
    for k, name in enumerate(row.threshold_names):
        args = list(op.lams)
        args[k] = torch.tensor(bad, dtype=torch.float64) if tensor else bad
        with pytest.raises(ValueError, match=rf"{op.name}: {name} must be a finite number >= 0"):
            run(op, w, tuple(args), 1)
        assert torch.equal(w, before)


@pytest.mark.triton_only
def test_bad_input_names_the_argument():
    from fastprox import _triton as kernels  # the CUDA kernel of the op: checks, then the entry

    w = torch.randn(4, 4, device=DEVICE)
    lam = torch.tensor([[0.0, 0.1, 0.0]], dtype=torch.float64)
    names = ["lam_l1", "lam", ""]

    def one(weight, dims):
        kernels.foreach_prox_([weight], lam, dims, [len(dims)], [True], [True], "group_shrink_",
                              names)

    with pytest.raises(TypeError, match="weight.* must be float32"):
        one(w.to(torch.int32), [1])
    with pytest.raises(ValueError, match="dim 5 is out of range"):
        one(w, [5])
    with pytest.raises(ValueError, match="more than once"):
        one(w, [1, -1])
    expanded = torch.randn(4, 1, device=DEVICE).expand(4, 4)
    with pytest.raises(ValueError, match="share memory"):
        one(expanded, [1])
    base = torch.randn(40, device=DEVICE)
    before = base.clone()
    with pytest.raises(ValueError, match="self-overlapping"):
        one(torch.as_strided(base, (6, 5), (2, 1)), [1])
    assert torch.equal(base, before)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        kernels.foreach_prox_([w, w[1:]], torch.zeros(2, 3, dtype=torch.float64) + 0.1,
                              [1, 1], [1, 1], [True, True], [True, True], "foreach_prox_",
                              list(fastprox.operators.COLUMNS))
    with pytest.raises(ValueError, match=r"foreach_prox_: lam_group\[1\] must be a finite"):
        kernels.foreach_prox_([w, w.clone()], torch.tensor([[0, 1, 0], [0, -1, 0.]],
                              dtype=torch.float64), [1, 1], [1, 1], [True, True],
                              [True, True], "foreach_prox_", list(fastprox.operators.COLUMNS))


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
    fastprox.foreach_prox_(weights, dim=dims, **lams)
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
    fastprox.foreach_prox_(weights, lam_group=0.2, lam_exclusive=0.05, dim=dims)
    for w, d in zip(singles, dims):
        fastprox.cges_shrink_(w, 0.2, 0.05, d)
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
    plans = launch.plan_prox(entries, table, flags, sms, Tables("cpu", upload=False))
    return sum(len(launches) for _, _, launches, _ in plans)


@pytest.mark.triton_only
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


@pytest.mark.triton_only
@pytest.mark.parametrize("exact", [True, False])
def test_paths_are_taken(path, monkeypatch, exact):
    """The path fixture reaches the kernels it names (the tests above rely on it)."""

    seen: list = []
    for name in ("prox_kernel", "split_stats_kernel", "split_apply_kernel"):
        monkeypatch.setitem(launch.KERNELS, name, _Counting(launch.KERNELS[name], seen, name))
    fastprox.cges_shrink_(_weight((37, 7), torch.float32), 0.1, 0.05, 0, exact=exact)
    if path == "split" and not exact:
        assert seen == ["split_stats_kernel", "split_apply_kernel"]
    else:
        assert seen == ["prox_kernel"]
