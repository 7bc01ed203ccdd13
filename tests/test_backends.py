"""The backends behind the dispatcher (fastprox/_registry.py): the default backend of devices
without kernels of their own (fastprox/_host.py: the C++ kernels on a host copy, written back),
and ``serve``, which has CPU tensors served by another backend for the length of a block."""

from __future__ import annotations

import pytest
import torch

import fastprox
from fastprox import _host, _registry, reference
from helpers import DTYPES, random_moment
from phase_checks import check_phase_ops

OPS = torch.ops.fastprox


class _HostOps:
    def __getattr__(self, name):
        return _host.ENTRIES[name]


def _lams(*rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_phase_ops_match_reference(dtype):
    check_phase_ops(_HostOps(), dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_host_step_is_the_cpu_kernels(dtype):
    """The fused step and the metric step on host copies give the C++ kernels' result bit for
    bit, written back into views (elements outside them untouched)."""
    base = torch.randn(12, 22).to(dtype)
    conv = torch.randn(6, 5, 3, 3).to(dtype)
    views = lambda b, c: [b[:, ::2], c.permute(1, 0, 2, 3)]  # noqa: E731
    dims, counts = [0, 1, 2, 3], [1, 3]
    lams = _lams([0.01, 0.3, 0.02], [0.0, 0.2, 0.05])
    mine_b, mine_c, want_b, want_c = base.clone(), conv.clone(), base.clone(), conv.clone()
    _host.foreach_prox_(views(mine_b, mine_c), lams, dims, counts, [True, False], [True, True])
    OPS.foreach_prox_(views(want_b, want_c), lams, dims, counts, [True, False], [True, True])
    assert torch.equal(mine_b, want_b) and torch.equal(mine_c, want_c)
    assert torch.equal(mine_b[:, 1::2], base[:, 1::2])
    moments = [random_moment(v.shape) for v in views(base, conv)]
    metric = torch.tensor([[1.0, 1e-8, 1e-3]] * 2, dtype=torch.float64)
    mine_b, mine_c, want_b, want_c = base.clone(), conv.clone(), base.clone(), conv.clone()
    _host.foreach_metric_prox_(views(mine_b, mine_c), moments, lams, metric, dims, counts,
                               [True, True], [True, False])
    OPS.foreach_metric_prox_(views(want_b, want_c), moments, lams, metric, dims, counts,
                             [True, True], [True, False])
    assert torch.equal(mine_b, want_b) and torch.equal(mine_c, want_c)
    w = torch.randn(7, 9).to(dtype)
    assert torch.equal(_host.group_norms(w, [1]), OPS.group_norms(w, [1]))


def test_host_refuses_what_a_copy_would_hide():
    """Checked where the tensors are, before any copy: a self-overlapping view, two weights in
    one memory, a moment that is a weight; nothing is written."""
    w = torch.randn(8, 8)
    before = w.clone()
    lam = _lams([0.0, 0.1, 0.0])
    with pytest.raises(ValueError, match="self-overlapping"):
        _host.foreach_prox_([torch.randn(8, 1).expand(8, 8)], lam, [1], [1], [True], [True])
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        _host.foreach_prox_([w, w[2:]], _lams([0, 0.1, 0], [0, 0.1, 0]), [1, 1], [1, 1],
                            [True] * 2, [True] * 2)
    buf = bytearray(4 * 64)  # two storages over one buffer: found by address
    a = torch.frombuffer(buf, dtype=torch.float32)[:40].view(8, 5)
    b = torch.frombuffer(buf, dtype=torch.float32, offset=4 * 16).view(8, 6)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        _host.foreach_prox_([a, b], _lams([0, 0.1, 0], [0, 0.1, 0]), [1, 1], [1, 1],
                            [True] * 2, [True] * 2)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] shares memory with weights\[0\]"):
        _host.foreach_metric_prox_([w], [w], lam, _lams([1.0, 1e-8, 1e-3]), [1], [1], [True],
                                   [True], ["exp_avg_sqs[0]"])
    with pytest.raises(ValueError, match="group_shrink_: lam must be a finite"):
        _host.foreach_prox_([w], _lams([0, -1.0, 0]), [1], [1], [True], [True],
                            "group_shrink_", ["", "lam", ""])
    assert torch.equal(w, before)


def test_serve_routes_the_public_api_and_restores(monkeypatch):
    """Within ``serve("reference")`` the public API's op calls on CPU tensors reach the
    reference, eager and compiled; after the block the C++ kernels are back."""
    calls = []
    fused = reference.fused_step

    def counting(*args):
        calls.append(args[-2] if len(args) > 6 else "foreach_prox_")
        return fused(*args)

    monkeypatch.setattr(reference, "fused_step", counting)
    w = torch.randn(10, 6)
    want = w.clone()
    fastprox.group_shrink_(want, 0.3)
    with _registry.serve("reference"):
        got = w.clone()
        fastprox.group_shrink_(got, 0.3)
        fastprox.foreach_prox_([w.clone()], lam_group=0.3)
        torch._dynamo.reset()
        compiled = w.clone()
        torch.compile(lambda t: fastprox.group_shrink_(t, 0.3), fullgraph=True)(compiled)
    assert len(calls) == 3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled, want)
    fastprox.group_shrink_(w.clone(), 0.3)
    assert len(calls) == 3


def test_serve_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="backend must be one of"):
        with _registry.serve("mps"):
            pass
    with pytest.raises(ValueError, match="host backend does not serve cpu"):
        with _registry.serve("host"):
            pass
    with pytest.raises(ValueError, match="cpp backend does not serve cuda"):
        with _registry.serve("cpp", "cuda"):
            pass
