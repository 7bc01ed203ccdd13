"""fastprox as torch custom ops: opcheck, torch.compile(fullgraph=True), no recompiles when a
threshold changes, and the autograd formula of group_norms."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fastprox
from fastprox.operators import COLUMNS, PRESETS
from helpers import OPS, random_weight, run

def _fused_args(row, lams, flags, dims):
    """The fused op's arguments for one preset call (as fastprox/_fused.py builds them)."""
    given = row.columns(lams)
    table = torch.tensor([[given.get(c, 0.0) for c in COLUMNS]], dtype=torch.float64)
    return lambda w: ([w], table, dims, [len(dims)], [flags.get("size_weighted", True)],
                      [flags.get("exact", True)], row.name, row.lam_names())


# Generated from the operator table: group_norms over rows and columns, every sample of every
# preset through the fused op (rows and columns), and the fused op on a list of two tensors.
OPCHECK_CASES = [("group_norms", "rows", lambda w: (w, [1])),
                 ("group_norms", "cols", lambda w: (w, [0]))]
for _row in PRESETS:
    for _i, (_lams, _flags) in enumerate(_row.samples):
        for _dims in ([1], [0]):
            OPCHECK_CASES.append(("foreach_prox_", f"{_row.name}{_i}-{_dims}",
                                  _fused_args(_row, _lams, _flags, _dims)))
OPCHECK_CASES.append(("foreach_prox_", "two-tensors", lambda w: (
    [w, w.clone()], torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.1, 0.05]], dtype=torch.float64),
    [1, 0], [1, 1], [True, False], [True, False], "foreach_prox_", list(COLUMNS))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, case, make_args", OPCHECK_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in OPCHECK_CASES])
def test_opcheck(name, case, make_args, dtype):
    op = getattr(torch.ops.fastprox, name).default
    for shape in [(7, 13), (3, 4, 5)]:
        torch.library.opcheck(op, make_args(random_weight(shape, dtype)))


@pytest.mark.parametrize("op", OPS, ids=str)
def test_compile_fullgraph_matches_eager(op):
    torch._dynamo.reset()

    def step(w, lams):
        run(op, w, lams=lams, dim=0 if op.grouped else None)
        return w

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w = random_weight((24, 18), torch.float32)
    eager, comp = w.clone(), w.clone()
    step(eager, op.lams)
    out = compiled(comp, op.lams)
    assert out is comp or out.data_ptr() == comp.data_ptr()
    assert torch.equal(eager, comp)


def test_compile_inductor_in_a_training_step():
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    @torch.compile(fullgraph=True)  # inductor: every op in one graph, no break
    def prox(weight, lam):
        with torch.no_grad():
            fastprox.group_shrink_(weight, lam, dim=0)
            fastprox.soft_threshold_(weight, lam / 100)
            fastprox.sparse_group_shrink_(weight, lam / 100, lam / 10, dim=1)
            fastprox.exclusive_shrink_(weight, lam / 10, dim=0)
            fastprox.cges_shrink_(weight, lam / 10, lam / 100, dim=0, size_weighted=False)
            return fastprox.group_norms(weight, dim=0)

    x = torch.randn(32, 16)
    model(x).pow(2).mean().backward()
    opt.step()
    want = model.weight.detach().clone()
    lam = torch.tensor(0.05, dtype=torch.float64)
    fastprox.group_shrink_(want, lam, dim=0)
    fastprox.soft_threshold_(want, lam / 100)
    fastprox.sparse_group_shrink_(want, lam / 100, lam / 10, dim=1)
    fastprox.exclusive_shrink_(want, lam / 10, dim=0)
    fastprox.cges_shrink_(want, lam / 10, lam / 100, dim=0, size_weighted=False)
    norms = prox(model.weight, lam)
    assert torch.equal(model.weight.detach(), want)
    assert torch.equal(norms, fastprox.group_norms(want, dim=0))


@pytest.mark.parametrize("kind", ["python float", "0-d tensor"])
def test_changing_lam_does_not_recompile_every_step(kind):
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(w, lam):
        fastprox.group_shrink_(w, lam, dim=0)
        return w

    w = random_weight((16, 8), torch.float32)
    for i in range(8):
        lam = 0.01 * (i + 1)
        step(w, lam if kind == "python float" else torch.tensor(lam, dtype=torch.float64))
    # A tensor never recompiles; a Python float is specialised once, then made dynamic.
    assert counter.frame_count <= (1 if kind == "0-d tensor" else 2)


def test_group_norms_gradient():
    w = torch.randn(5, 4, dtype=torch.float64)
    w[2] = 0  # a zero group: gradient 0, never NaN
    w.requires_grad_(True)
    norms = fastprox.group_norms(w)
    norms.sum().backward()
    assert not w.grad.isnan().any()
    assert (w.grad[2] == 0).all()
    torch.testing.assert_close(w.grad[[0, 1, 3, 4]],
                               (w / w.norm(dim=1, keepdim=True)).detach()[[0, 1, 3, 4]])
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: fastprox.group_norms(t, dim=(0, 2)), (x,))
    torch.autograd.gradcheck(lambda t: fastprox.group_norms(t, dim=1), (x,))


def test_missing_extension_fails_loudly():
    # No silent fallback to the reference: without its C++ library, import says what to do.
    import subprocess
    import sys

    code = "import sys; sys.modules['fastprox._C'] = None; import fastprox"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "fastprox._C failed to load" in proc.stderr
    assert "--no-build-isolation" in proc.stderr


def _default_backend(op):
    """The kernel the dispatcher gives a device without fused kernels (the reference)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return lambda *args: op.redispatch(keys, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, case, make_args", OPCHECK_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in OPCHECK_CASES])
def test_default_backend_is_the_reference(name, case, make_args, dtype):
    op = getattr(torch.ops.fastprox, name).default
    w = random_weight((9, 14), dtype)
    fused_args, default_args = make_args(w.clone()), make_args(w.clone())
    fused_out = op(*fused_args)
    default_out = _default_backend(op)(*default_args)
    fused = [fused_out] if name == "group_norms" else fused_args[0]
    default = [default_out] if name == "group_norms" else default_args[0]
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=8e-3)
    for a, b in zip(fused, default):
        torch.testing.assert_close(b, a, **tol)


def test_default_backend_checks_thresholds_first():
    op = torch.ops.fastprox.foreach_prox_.default
    ws = [torch.randn(4, 3), torch.randn(5, 2)]
    before = [w.clone() for w in ws]
    lams = torch.tensor([[0.0, 0.1, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"foreach_prox_: lam_group\[1\] must be a finite"):
        _default_backend(op)(ws, lams, [1, 1], [1, 1], [True, True], [True, True],
                             "foreach_prox_", list(COLUMNS))
    assert all(torch.equal(a, b) for a, b in zip(ws, before))


def test_metric_step_compiles_fullgraph():
    """foreach_metric_prox_ under torch.compile(fullgraph=True) gives the eager result, and the
    op's own checks still refuse damaged moments inside the graph."""
    w = torch.randn(16, 12)
    v = torch.rand(16, 12) * 1e-4

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(w, v):
        fastprox.foreach_metric_prox_([w], [v], lr=1e-3, lam_l1=0.01, lam_group=0.5, dim=0,
                                      step=7)
        return w

    eager = w.clone()
    fastprox.foreach_metric_prox_([eager], [v], lr=1e-3, lam_l1=0.01, lam_group=0.5, dim=0,
                                  step=7)
    assert torch.equal(step(w.clone(), v), eager)
    bad = v.clone()
    bad[3, 4] = float("nan")
    x = w.clone()
    with pytest.raises(Exception, match="has negative, NaN or infinite entries"):
        step(x, bad)
    assert torch.equal(x, w)
