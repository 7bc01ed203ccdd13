"""The step of coupled groups in an optimizer's metric: ``coupled_metric_prox_`` (the public
function and the fused op ``torch.ops.fastprox.coupled_metric_prox_``, C++ on the CPU) against
the float64 oracle (per group, the plain metric step on its joined slices), its optimality
conditions, its checks, and the Regularizer's AdamW path through it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastprox
from coupled_metric_cases import LAMS, oracle, random_set, tolerance, wide_set
from helpers import TinyMLP
from fastprox import reference
from fastprox.metric import _slice_table, coupled_metric_prox_, coupled_metric_step

OPS = torch.ops.fastprox


def _close(got, want, dtype):
    torch.testing.assert_close(got.detach().double().cpu(), want, equal_nan=True,
                               **tolerance(dtype))


@pytest.mark.parametrize("lams", LAMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("special", [False, True], ids=["plain", "zero-nan-inf-d0"])
def test_direct_metric_matches_the_oracle(dtype, lams, special):
    groups, members, ds = random_set(dtype, special=special)
    want = oracle(groups, ds, **lams)
    coupled_metric_prox_(groups, ds, **lams)
    for got, w in zip(members, want):
        _close(got, w, dtype)
    if special and lams.get("lam_group", 0) > 0:  # the zero group stays zero, never NaN
        assert bool((members[0][[i for i, g in enumerate(groups.slices[0].index) if g == 2]]
                     == 0).all())


def _adam_rows(members):
    """Per member, (scale, eps, lr) of different parameter groups' metrics."""
    return [(1.0 / (1 - 0.999 ** (3 + k)), 1e-8 * (k + 1), 1e-3 * (1 + 0.5 * k))
            for k in range(len(members))]


@pytest.mark.parametrize("lams", LAMS[:5], ids=lambda d: ",".join(f"{k}={v}" for k, v in
                                                                  d.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_adam_metric_matches_the_oracle(dtype, lams):
    """Moments and (scale, eps, lr) per member: d formed in the kernel, as the plain step
    forms it."""
    groups, members, vs = random_set(dtype)
    vs = [v * 1e-6 for v in vs]
    rows = _adam_rows(members)
    ds = [((v.double() * s).sqrt() + e) / lr for v, (s, e, lr) in zip(vs, rows)]
    want = oracle(groups, ds, **lams)
    args = (lams.get("lam_l1", 0.0), lams.get("lam_group", 0.0), lams.get("lam_exclusive", 0.0))
    coupled_metric_step([groups], [vs], [rows], [args], [lams.get("size_weighted", True)],
                        [lams.get("exact", True)])
    for got, w in zip(members, want):
        _close(got, w, dtype)


def test_sets_sharing_a_tensor_run_in_order():
    """A conv weight in two sets (its output channels in one, its input channels in the
    next, as in a ResNet): one call, the second set reads what the first wrote."""
    w1 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    w2 = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    b1 = torch.randn(6, dtype=torch.float64)
    first = fastprox.CoupledGroups([(w1, 0, range(6)), (b1, 0, range(6))], 6, name="a")
    second = fastprox.CoupledGroups([(w2, 0, range(5)), (w1, 1, [0, 1, 2, 3])], 5, name="b")
    ds = {id(t): torch.rand(t.shape, dtype=torch.float64) + 0.1 for t in (w1, w2, b1)}
    lams = (0.0, 0.3, 0.0)
    want1 = oracle(first, [ds[id(w1)], ds[id(b1)]], lam_group=0.3)
    expected_w1 = want1[0]
    after_first = fastprox.CoupledGroups(
        [(w2.clone(), 0, range(5)), (expected_w1.clone(), 1, [0, 1, 2, 3])], 5)
    want2 = oracle(after_first, [ds[id(w2)], ds[id(w1)]], lam_group=0.3)
    coupled_metric_step([first, second], [[ds[id(w1)], ds[id(b1)]], [ds[id(w2)], ds[id(w1)]]],
                        [None, None], [lams, lams], [True, True], [True, True], direct=True)
    torch.testing.assert_close(b1, want1[1])
    torch.testing.assert_close(w2, want2[0])
    torch.testing.assert_close(w1, want2[1])


def test_kkt_conditions_of_the_sparse_group_step():
    """Optimality without a reference: per group g with result x and metric D, either x_g = 0
    and ||soft(D z_g, l1)|| <= t_g, or for every element D(x - z) + l1 s + t_g x / ||x_g|| = 0
    with s = sign(x) where x != 0 and |d z| <= l1 where x = 0."""
    groups, members, ds = random_set(torch.float64)
    z = [m.clone() for m in members]
    l1, lg = 0.03, 0.25
    coupled_metric_prox_(groups, ds, lam_l1=l1, lam_group=lg)
    sizes = groups.sizes.tolist()
    for grp in range(groups.num_groups):
        parts = [(k, p) for k, m in enumerate(groups.slices)
                 for p in range(m.tensor.shape[m.axis]) if int(m.index[p]) == grp]
        if not parts:
            continue
        def pick(ts):
            return torch.cat([ts[k].movedim(groups.slices[k].axis, 0)[p].reshape(-1)
                              for k, p in parts])

        x, zz, d = pick(members), pick(z), pick(ds)
        t = lg * math.sqrt(sizes[grp])
        if bool((x == 0).all()):
            soft = (d * zz).abs().sub(l1).clamp(min=0)
            assert float(soft.norm()) <= t * (1 + 1e-9)
            continue
        norm = x.norm()
        nz = x != 0
        residual = d * (x - zz) + l1 * x.sign() + t * x / norm
        assert float(residual[nz].abs().max()) < 1e-8
        assert bool(((d * zz)[~nz].abs() <= l1 * (1 + 1e-9)).all())


def test_the_result_does_not_depend_on_the_thread_count():
    results = []
    for threads in (1, 2):
        torch.manual_seed(0)
        groups, members, ds = wide_set(torch.float32)  # several blocks
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            coupled_metric_prox_(groups, ds, lam_l1=0.01, lam_group=0.15, lam_exclusive=0.02)
        finally:
            torch.set_num_threads(before)
        results.append([m.clone() for m in members])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_many_blocks_of_narrow_columns_match_the_oracle(dtype):
    """Groups over several of the kernel's blocks, most of their slices a few elements of every
    row (columns, 1x1 and 3x3 input channels, one member permuted, one strided), in Adam's
    metric: each group is the oracle's, whichever block and traversal holds it."""
    groups, members, vs = wide_set(dtype)
    vs = [v * 1e-6 for v in vs]
    rows = _adam_rows(members)
    ds = [((v.double() * s).sqrt() + e) / lr for v, (s, e, lr) in zip(vs, rows)]
    lams = dict(lam_l1=1e-3, lam_group=2.0, lam_exclusive=1e-3)
    want = oracle(groups, ds, **lams)
    coupled_metric_step([groups], [vs], [rows], [tuple(lams.values())], [True], [True])
    for got, w in zip(members, want):
        _close(got, w, dtype)
    dead = int((want[0] == 0).all(dim=1).sum())  # fc1's rows, in group order
    assert 0 < dead < groups.num_groups  # some groups zero, some solved by Newton's method


def _op_args(groups, ds, lams=(0.01, 0.2, 0.02), direct=True):
    slices, starts = _slice_table(groups)
    t = lams[1] * groups.sizes.double().sqrt()
    members = [m.tensor for m in groups.slices]
    return (members, list(ds), [m.axis for m in groups.slices],
            torch.tensor([(1.0, 0.0, 1.0)] * len(members), dtype=torch.float64),
            [len(members)], [slices], [starts], [t], [lams[0]], [lams[2]], [True], direct)


def test_opcheck():
    groups, _, ds = random_set(torch.float32)
    torch.library.opcheck(OPS.coupled_metric_prox_.default, _op_args(groups, ds))


def test_the_reference_op_matches_the_kernel():
    groups, members, ds = random_set(torch.float64)
    copies = [m.clone() for m in members]
    args = list(_op_args(groups, ds))
    reference.coupled_metric_prox_op(copies, *args[1:])
    OPS.coupled_metric_prox_(*args)
    for a, b in zip(members, copies):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _bad(args, k, value):
    args = list(args)
    args[k] = value
    return args


@pytest.mark.parametrize("case,match", [
    ("metric", "metric\\[1\\] must be"), ("starts", "starts\\[0\\] must run from 0"),
    ("slices-member", "slices\\[0\\] names member"), ("slices-position", "names position 9"),
    ("slices-twice", "twice"), ("thresholds", "thresholds\\[0\\] must be finite"),
    ("lam", "lam_l1\\[0\\]"), ("moment", "ds\\[3\\], the metric of member 3 \\(conv\\)"),
    ("moment-shape", "moments\\[0\\] has shape"), ("axes", "axes\\[1\\]"),
    ("shared", "shares memory with members\\[0\\]")])
def test_bad_input_raises_before_any_write(case, match):
    groups, members, ds = random_set(torch.float32)
    args = list(_op_args(groups, ds))
    names = None
    if case == "metric":
        args[3] = args[3].clone()
        args[3][1, 2] = 0.0
    elif case == "starts":
        args[6] = [args[6][0] + 1]
    elif case == "slices-member":
        args[5] = [args[5][0].clone()]
        args[5][0][0, 0] = 7
    elif case == "slices-position":
        args[5] = [args[5][0].clone()]
        args[5][0][0, 1] = 9
    elif case == "slices-twice":
        args[5] = [args[5][0].clone()]
        args[5][0][1] = args[5][0][0]
    elif case == "thresholds":
        args[7] = [args[7][0].clone()]
        args[7][0][0] = math.nan
    elif case == "lam":
        args[8] = [-1.0]
    elif case == "moment":
        args[1] = list(args[1])
        args[1][3] = args[1][3].clone()
        args[1][3][0, 0, 0, 0] = math.inf
        names = [f"ds[{k}], the metric of member {k} ({m.name}) of set,"
                 for k, m in enumerate(groups.slices)]
    elif case == "moment-shape":
        args[1] = [args[1][0].t()] + list(args[1][1:])
    elif case == "axes":
        args[2] = [0, 2, 0, 1, 1]
    elif case == "shared":
        args[1] = [members[0]] + list(args[1][1:])
    before = [m.clone() for m in members]
    with pytest.raises(ValueError, match="coupled_metric_prox_: .*" + match):
        OPS.coupled_metric_prox_(*args, names)
    for a, b in zip(members, before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_a_damaged_second_set_leaves_the_first_unwritten():
    groups, members, ds = random_set(torch.float32)
    other, other_members, other_ds = random_set(torch.float32)
    other_ds[2] = other_ds[2].clone()
    other_ds[2][0] = -1.0
    before = [m.clone() for m in members + other_members]
    lams = (0.0, 0.2, 0.0)
    with pytest.raises(ValueError, match="moments\\[7\\] has negative"):
        coupled_metric_step([groups, other], [ds, other_ds], [None, None], [lams, lams],
                            [True, True], [True, True], direct=True)
    for a, b in zip(members + other_members, before):
        assert torch.equal(a, b)



@pytest.mark.parametrize("damaged", ["shared", "view"])
def test_a_moment_read_by_two_sets_is_checked(damaged):
    """A conv weight in two sets (output channels, then input channels), its moment given to
    both (what the Regularizer gives: the parameter's exp_avg_sq): read once, and refused when
    damaged; the second set's other moment, a view that overlaps the first one's memory but
    reaches past it, is checked on its own. Nothing is written."""
    kw = dict(dtype=torch.float32)
    w1, w2, b1 = torch.randn(6, 4, 3, 3, **kw), torch.randn(5, 6, 3, 3, **kw), torch.randn(6, **kw)
    first = fastprox.CoupledGroups([(w1, 0, range(6)), (b1, 0, range(6))], 6, name="a")
    second = fastprox.CoupledGroups([(w2, 0, range(5)), (w1, 1, [0, 1, 2, 3])], 5, name="b")
    flat = torch.rand(w1.numel() + w2.numel(), **kw) + 0.1
    v1, vb = flat[:w1.numel()].view(w1.shape), torch.rand(6, **kw) + 0.1
    v2 = flat[100:100 + w2.numel()].view(w2.shape)  # from inside v1 to past its end
    if damaged == "shared":
        v1[5, 3, 2, 2] = float("nan")
    else:
        v2.view(-1)[200] = -1.0  # past v1's memory
    before = [t.clone() for t in (w1, w2, b1)]
    lams = (0.0, 0.3, 0.0)
    with pytest.raises(ValueError, match="has negative, NaN or infinite entries"):
        coupled_metric_step([first, second], [[v1, vb], [v2, v1]], [None, None], [lams, lams],
                            [True, True], [True, True], direct=True)
    for a, b in zip((w1, w2, b1), before):
        assert torch.equal(a, b)

def test_lam_zero_and_empty_sets_are_bit_identical():
    groups, members, ds = random_set(torch.float32)
    before = [m.clone() for m in members]
    coupled_metric_prox_(groups, ds)
    coupled_metric_prox_(groups, ds, lam_group=0.0, lam_l1=0.0)
    for a, b in zip(members, before):
        assert torch.equal(a, b)
    empty = torch.empty(0, 4)
    g = fastprox.CoupledGroups([(empty, 0, [])], 0)
    coupled_metric_prox_(g, [torch.empty(0, 4)], lam_group=0.5)
    one = torch.tensor([[0.5]])
    g = fastprox.CoupledGroups([(one, 0, [0])], 1)
    coupled_metric_prox_(g, [torch.tensor([[2.0]])], lam_group=0.1)
    torch.testing.assert_close(one, torch.tensor([[0.45]]))  # x = z (1 - t / (d |z|))


def test_regularizer_adamw_step_is_the_oracle_with_adams_metric():
    """A coupled MLP trained one AdamW step (weights and biases in parameter groups of their
    own): prox_step(opt) is the oracle with d = (sqrt(v_hat) + eps) / lr of each parameter;
    the optimizer's state is untouched."""
    model = torch.nn.Sequential(TinyMLP())
    mlp = model[0]
    reg = fastprox.Regularizer(model, "neurons", lam=0.05)
    opt = torch.optim.AdamW([{"params": [mlp.up.weight, mlp.down.weight], "lr": 1e-2},
                             {"params": [mlp.up.bias, mlp.down.bias], "lr": 2e-2,
                              "eps": 1e-6}])
    model(torch.randn(16, 6)).square().mean().backward()
    opt.step()
    assert reg.coupled, "the MLP's hidden units are one coupled set"
    (t,) = reg.coupled.values()
    g = t.groups
    state = opt.state
    ds = []
    for m in g.slices:
        p = next(q for q in model.parameters() if q.untyped_storage().data_ptr()
                 == m.tensor.untyped_storage().data_ptr())
        group = next(pg for pg in opt.param_groups if any(q is p for q in pg["params"]))
        d = reference.adam_metric(state[p]["exp_avg_sq"], state[p]["step"], 0.999,
                                  group["eps"], group["lr"])
        ds.append(d.as_strided(m.tensor.shape, m.tensor.stride(),
                               m.tensor.storage_offset() - p.storage_offset()))
    want = oracle(g, ds, lam_l1=t.lam_l1, lam_group=t.lam_group, lam_exclusive=t.lam_exclusive,
                  size_weighted=t.size_weighted, exact=t.exact)
    saved = copy.deepcopy(opt.state_dict())
    reg.prox_step(opt)
    for m, w in zip(g.slices, want):
        torch.testing.assert_close(m.tensor.double(), w, rtol=3e-5, atol=3e-6)
    assert str(opt.state_dict()["state"]) == str(saved["state"])


def test_regularizer_adamw_step_reads_the_optimizer_numbers_at_once(monkeypatch):
    """The AdamW step of coupled sets reads the step counts (tensors: on the GPU for a fused
    or capturable AdamW) and the groups' lr, eps and beta2 in one transfer per device, never
    one number per member (each a host synchronisation on CUDA), and steps what it stepped
    before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(TinyMLP(), TinyMLP())
    reg = fastprox.Regularizer(model, "neurons", lam=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    model(torch.randn(16, 6)).square().mean().backward()
    opt.step()
    assert len(reg.coupled) == 2 and torch.is_tensor(opt.state[model[0].up.weight]["step"])
    want = copy.deepcopy(model)
    reg_want = fastprox.Regularizer(want, "neurons", lam=0.05)
    opt_want = torch.optim.AdamW(want.parameters(), lr=1e-2)
    opt_want.load_state_dict(opt.state_dict())
    for group in opt_want.param_groups:
        group["lr"] = 1e-2
    reg_want.prox_step(opt_want)

    def no_item(self):
        raise AssertionError("a number read from a tensor on its own")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    reg.prox_step(opt)
    monkeypatch.undo()
    for a, b in zip(model.parameters(), want.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_heads_of_a_fused_projection(dtype):
    """Heads as GPT-2 lays them out: runs of neighbouring columns of a fused QKV weight (three
    runs per head, read row by row) and rows of the output projection, in one group each."""
    heads, dim, width = 3, 4, 5
    qkv = (torch.randn(width, 3 * heads * dim, dtype=torch.float64) * 0.3).to(dtype)
    bias = (torch.randn(3 * heads * dim, dtype=torch.float64) * 0.3).to(dtype)
    proj = (torch.randn(heads * dim, width, dtype=torch.float64) * 0.3).to(dtype)
    index = [(c % (heads * dim)) // dim for c in range(3 * heads * dim)]
    groups = fastprox.CoupledGroups([(qkv, 1, index), (bias, 0, index),
                                     (proj, 0, [r // dim for r in range(heads * dim)])], heads)
    ds = [torch.rand(t.shape, dtype=torch.float64).to(dtype) + 0.2 for t in (qkv, bias, proj)]
    want = oracle(groups, ds, lam_l1=0.01, lam_group=0.2, lam_exclusive=0.01)
    coupled_metric_prox_(groups, ds, lam_l1=0.01, lam_group=0.2, lam_exclusive=0.01)
    for got, w in zip((qkv, bias, proj), want):
        _close(got, w, dtype)


def test_the_default_backend_is_the_cpu_kernel_on_host_copies():
    """fastprox/_host.py's entry (every device without kernels of its own) gives the C++
    kernel's result bit for bit, set by set (two sets holding one tensor included), and
    refuses a damaged moment before writing anything."""
    from fastprox import _host

    def case():
        torch.manual_seed(1)
        w1 = torch.randn(6, 4, 3, 3)
        w2 = torch.randn(5, 6, 3, 3)
        first = fastprox.CoupledGroups([(w1, 0, range(6))], 6)
        second = fastprox.CoupledGroups([(w2, 0, range(5)), (w1, 1, [0, 1, 2, 3])], 5)
        args = [_op_args(first, [torch.rand(6, 4, 3, 3) + 0.1]),
                _op_args(second, [torch.rand(5, 6, 3, 3) + 0.1, torch.rand(6, 4, 3, 3) + 0.1])]
        joined = [a + b if isinstance(a, list) else torch.cat([a, b]) for a, b in
                  zip(args[0][:-1], args[1][:-1])]
        joined[4] = [1, 2]
        return (w1, w2), joined

    (a1, a2), args = case()
    OPS.coupled_metric_prox_(*args, True)
    (b1, b2), host_args = case()
    _host.coupled_metric_prox_(*host_args, True)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    (c1, c2), bad = case()
    bad[1][2] = bad[1][2].clone()
    bad[1][2][0, 0, 0, 0] = -1.0
    before = (c1.clone(), c2.clone())
    with pytest.raises(ValueError, match="moments\\[2\\] has negative"):
        _host.coupled_metric_prox_(*bad, True)
    assert torch.equal(c1, before[0]) and torch.equal(c2, before[1])
