"""The bad-input catalog: each error's type and message (naming the argument), weight unchanged."""

import math

import pytest
import torch

import fastprox

W = lambda: torch.randn(6, 5)  # noqa: E731

# (call, exception type, a fragment the message must contain). `w` is the weight passed.
CATALOG = [
    ("not a tensor", lambda w: fastprox.group_shrink_([[1.0]], 0.1), TypeError, "weight"),
    ("numpy array", lambda w: fastprox.soft_threshold_(w.numpy(), 0.1), TypeError, "weight"),
    ("int weight", lambda w: fastprox.group_shrink_(w.to(torch.int32), 0.1), TypeError, "weight"),
    ("bool weight", lambda w: fastprox.group_norms(w > 0), TypeError, "weight"),
    ("complex weight", lambda w: fastprox.exclusive_shrink_(w.to(torch.complex64), 0.1),
     TypeError, "weight"),
    ("0-d weight", lambda w: fastprox.group_shrink_(w[0, 0], 0.1), ValueError, "weight"),
    ("sparse weight", lambda w: fastprox.group_shrink_(w.to_sparse(), 0.1), TypeError, "weight"),
    ("csr weight", lambda w: fastprox.soft_threshold_(w.to_sparse_csr(), 0.1), TypeError,
     "weight"),
    ("negative lam", lambda w: fastprox.group_shrink_(w, -0.1), ValueError, "lam"),
    ("nan lam", lambda w: fastprox.soft_threshold_(w, math.nan), ValueError, "lam"),
    ("inf lam", lambda w: fastprox.exclusive_shrink_(w, math.inf), ValueError, "lam"),
    ("negative tensor lam", lambda w: fastprox.group_shrink_(w, torch.tensor(-1.0)), ValueError,
     "lam"),
    ("nan tensor lam_l1", lambda w: fastprox.sparse_group_shrink_(w, torch.tensor(math.nan), 0.1),
     ValueError, "lam_l1"),
    ("inf lam_group", lambda w: fastprox.sparse_group_shrink_(w, 0.1, math.inf), ValueError,
     "lam_group"),
    ("negative lam_exclusive", lambda w: fastprox.cges_shrink_(w, 0.1, -1e-9), ValueError,
     "lam_exclusive"),
    ("string lam", lambda w: fastprox.group_shrink_(w, "0.1"), TypeError, "lam"),
    ("bool lam", lambda w: fastprox.group_shrink_(w, True), TypeError, "lam"),
    ("None lam", lambda w: fastprox.exclusive_shrink_(w, None), TypeError, "lam"),
    ("1-element 1-d tensor lam", lambda w: fastprox.group_shrink_(w, torch.tensor([0.1])),
     ValueError, "lam"),
    ("vector lam", lambda w: fastprox.group_shrink_(w, torch.rand(6)), ValueError, "lam"),
    ("complex tensor lam", lambda w: fastprox.group_shrink_(w, torch.tensor(1j)), TypeError, "lam"),
    ("meta-device lam", lambda w: fastprox.group_shrink_(w, torch.tensor(0.1, device="meta")),
     ValueError, "lam"),
    ("dim out of range", lambda w: fastprox.group_shrink_(w, 0.1, dim=2), ValueError, "dim"),
    ("negative dim out of range", lambda w: fastprox.group_norms(w, dim=-3), ValueError, "dim"),
    ("repeated dim", lambda w: fastprox.exclusive_shrink_(w, 0.1, dim=(0, 0)), ValueError, "dim"),
    ("repeated dim, negative", lambda w: fastprox.cges_shrink_(w, 0.1, 0.1, dim=(1, -1)),
     ValueError, "dim"),
    ("float dim", lambda w: fastprox.group_shrink_(w, 0.1, dim=1.0), TypeError, "dim"),
    ("bool dim", lambda w: fastprox.group_shrink_(w, 0.1, dim=True), TypeError, "dim"),
    ("string dim", lambda w: fastprox.group_shrink_(w, 0.1, dim="rows"), TypeError, "dim"),
    ("size_weighted not bool", lambda w: fastprox.group_shrink_(w, 0.1, size_weighted=1),
     TypeError, "size_weighted"),
    ("exact not bool", lambda w: fastprox.exclusive_shrink_(w, 0.1, exact="yes"), TypeError,
     "exact"),
    ("expanded weight", lambda w: fastprox.group_shrink_(w[:1].expand(6, 5), 0.1), ValueError,
     "weight"),
    # a self-overlapping view: rows that share elements (matches no formula), for every
    # operator that writes
    *[(f"self-overlapping view, {name}", call, ValueError, f"{name}: {arg} has elements that "
       "share memory") for name, arg, call in [
        ("group_shrink_", "weight", lambda w: fastprox.group_shrink_(_overlapping(w), 0.1)),
        ("soft_threshold_", "weight", lambda w: fastprox.soft_threshold_(_overlapping(w), 0.1)),
        ("sparse_group_shrink_", "weight",
         lambda w: fastprox.sparse_group_shrink_(_overlapping(w), 0.1, 0.1)),
        ("exclusive_shrink_", "weight",
         lambda w: fastprox.exclusive_shrink_(_overlapping(w), 0.1)),
        ("cges_shrink_", "weight", lambda w: fastprox.cges_shrink_(_overlapping(w), 0.1, 0.1)),
        ("foreach_prox_", "weights\\[0\\]",
         lambda w: fastprox.foreach_prox_([_overlapping(w)], lam_group=0.1)),
        ("foreach_metric_prox_", "weights\\[0\\]", lambda w: fastprox.foreach_metric_prox_(
            [_overlapping(w)], [torch.rand(6, 5)], lr=1e-3, lam_group=0.1)),
        ("CoupledGroups", "slices\\[0\\].tensor",
         lambda w: fastprox.CoupledGroups([(_overlapping(w), 0, range(6))], 6)),
    ]],
    # the metric step's second moments (the optimizer's state): damaged, wrong or aliased
    ("negative moment", lambda w: _metric(w, _moment(-1e-8)), ValueError,
     "exp_avg_sqs\\[0\\] has negative, NaN or infinite entries"),
    ("NaN moment", lambda w: _metric(w, _moment(math.nan)), ValueError,
     "exp_avg_sqs\\[0\\] has negative, NaN or infinite entries"),
    ("inf moment", lambda w: _metric(w, _moment(math.inf)), ValueError,
     "exp_avg_sqs\\[0\\] has negative, NaN or infinite entries"),
    ("moment of the wrong shape", lambda w: _metric(w, torch.rand(5, 6)), ValueError,
     "exp_avg_sqs\\[0\\] has shape"),
    ("integer moment", lambda w: _metric(w, torch.ones(6, 5, dtype=torch.int32)), TypeError,
     "exp_avg_sqs\\[0\\] must be float"),
    ("moment that is the weight", lambda w: _metric(w, w), ValueError,
     "exp_avg_sqs\\[0\\] shares memory with weights\\[0\\]"),
    ("moment that views the weight", lambda w: _metric(w, w.t().t()), ValueError,
     "exp_avg_sqs\\[0\\] shares memory with weights\\[0\\]"),
    ("moment on another device", lambda w: _metric(w, torch.rand(6, 5, device="meta")),
     ValueError, "exp_avg_sqs\\[0\\] is on meta"),
    ("moment list of the wrong length", lambda w: fastprox.foreach_metric_prox_(
        [w], [], lr=1e-3, lam_group=0.1), ValueError, "exp_avg_sqs has 0 tensors"),
    ("negative lr", lambda w: _metric(w, torch.rand(6, 5), lr=-1e-3), ValueError, "lr\\[0\\]"),
    ("NaN lr", lambda w: _metric(w, torch.rand(6, 5), lr=math.nan), ValueError, "lr\\[0\\]"),
    ("metric NaN lam_group", lambda w: _metric(w, torch.rand(6, 5), lam_group=math.nan),
     ValueError, "lam_group\\[0\\]"),
    ("metric grad mode", lambda w: _metric(w.requires_grad_(), torch.rand(6, 5)), RuntimeError,
     "foreach_metric_prox_: weights\\[0\\] is a leaf Variable that requires grad"),
]


def _overlapping(w):
    return torch.as_strided(w, (6, 5), (2, 1))


def _moment(bad):
    v = torch.rand(6, 5)
    v[3, 2] = bad
    return v


def _metric(w, v, lr=1e-3, lam_group=0.1):
    return fastprox.foreach_metric_prox_([w], [v], lr=lr, lam_group=lam_group, step=3)


@pytest.mark.parametrize("name, call, exc, fragment", CATALOG, ids=[c[0] for c in CATALOG])
def test_bad_input_raises_and_leaves_weight_untouched(name, call, exc, fragment):
    w = W()
    w[0, 0] = math.nan  # NaN payloads must survive too
    before = w.clone()
    with pytest.raises(exc, match=fragment):
        call(w)
    assert w.detach().view(torch.int32).equal(before.view(torch.int32)), \
        "weight changed by a failed call"


F64 = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
NAMES = ["lam_l1", "lam", ""]


@pytest.mark.parametrize("name, args, fragment", [
    ("negative lam", (F64(0, -1.0, 0), [1], [1]), "group_shrink_: lam must be a finite"),
    ("bad dim", (F64(0, 0.1, 0), [5], [1]), "out of range"),
    ("repeated dim", (F64(0, 0.1, 0), [1, 1], [2]), "more than once"),
    ("lams of the wrong size", (torch.ones(4, dtype=torch.float64), [1], [1]), "lams"),
    ("dims do not match", (F64(0, 0.1, 0), [1], [2]), "dim_counts"),
])
def test_raw_op_checks_its_arguments(name, args, fragment):
    # torch.ops.fastprox.* is public too: its C++ checks keep bad calls from undefined behaviour.
    w = W()
    before = w.clone()
    lams, dims, counts = args
    with pytest.raises((ValueError, TypeError, RuntimeError), match=fragment):
        torch.ops.fastprox.foreach_prox_([w], lams, dims, counts, [True], [True],
                                         "group_shrink_", NAMES)
    assert torch.equal(w, before)


def test_requires_grad_leaf_is_treated_like_torch_inplace_ops():
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        w.mul_(2)  # what torch does ...
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fastprox.group_shrink_(w, 0.1)  # ... and what fastprox does
    with torch.no_grad():
        fastprox.group_shrink_(w, 0.1)  # the documented use: after optimizer.step()


def test_requires_grad_non_leaf_has_no_derivative():
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 2
    before = y.detach().clone()
    with pytest.raises(RuntimeError, match="no derivative"):
        fastprox.group_shrink_(y, 0.1)
    assert torch.equal(y.detach(), before)


def test_version_counter_is_bumped_like_torch_inplace_ops():
    # So that autograd notices a weight modified after it was saved for backward.
    w = torch.randn(4, 3, requires_grad=True)
    loss = (w ** 2).sum()
    with torch.no_grad():
        version = w._version
        fastprox.group_shrink_(w, 0.1)
        assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
