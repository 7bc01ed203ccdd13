"""The Triton phase kernels (kernels/group_phases.py) against the reference, on every layout and
dtype, through both sweep sizes (one sub-tile per group, several), and the coupled step and the
phases of the sharded path running on them."""

from __future__ import annotations

import math

import pytest
import torch

import fastprox
from fastprox import CoupledGroups, Slice, reference
from fastprox import _triton as kernels  # the ops' CUDA kernels: the checks, then the entries
from helpers import DTYPES
from kernel_calls import DEVICE, on_triton_paths
from phase_checks import check_phase_ops

from fastprox.kernels import tiles


@pytest.fixture(params=["one", "several"])
def sweeps(request, monkeypatch):
    """Groups in one sub-tile, or in several (small loop tiles of the Triton kernels: the other
    backends run the first case alone)."""
    if request.param == "several" and not on_triton_paths(request):
        pytest.skip("an engine path of the Triton kernels")
    if request.param == "several":
        monkeypatch.setattr(tiles, "LOOP_ELEMS", 32)
    return request.param


class _Entries:
    def __getattr__(self, name):
        return kernels.ENTRIES[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phase_ops_match_reference(dtype, sweeps):
    if sweeps == "several" and dtype.itemsize == 2:
        pytest.skip("16-bit weights: the same sweeps as float32 (one sub-tile size is enough)")
    check_phase_ops(_Entries(), dtype, DEVICE)


def test_bad_input_before_any_launch():
    w, v = torch.randn(6, 5, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    before = w.clone(), v.clone()
    with pytest.raises(ValueError, match="foreach_group_rewrite_: lam_l1\\[1\\]"):
        kernels.foreach_group_rewrite_([w, v], [1, 1], [1, 1], [0.0, -1.0], [None, None],
                                       [None, None])
    with pytest.raises(ValueError, match="scales\\[1\\] has 5 values for 3 groups"):
        kernels.foreach_group_rewrite_([w, v], [1, 1], [1, 1], [0.0, 0.0],
                                       [torch.rand(6, device=DEVICE), torch.rand(5, device=DEVICE)],
                                       [None, None])
    with pytest.raises(ValueError, match="share memory"):
        kernels.foreach_group_rewrite_([w, w[:2]], [1, 1], [1, 1], [0.0, 0.0],
                                       [torch.rand(6, device=DEVICE), torch.rand(2, device=DEVICE)],
                                       [None, None])
    with pytest.raises(ValueError, match="foreach_group_sums: what"):
        kernels.foreach_group_sums([w], [1], [1], [0.0], 4)
    with pytest.raises(ValueError, match="foreach_group_sums_above: taus"):
        kernels.foreach_group_sums_above([w], [1], [1], [0.0], [None], [None])
    assert torch.equal(w, before[0]) and torch.equal(v, before[1])


def test_sums_are_deterministic():
    w = torch.randn(300, 70, device=DEVICE)
    first = kernels.foreach_group_sums([w], [0], [1], [0.01], 3)[0]
    for _ in range(2):
        assert torch.equal(kernels.foreach_group_sums([w], [0], [1], [0.01], 3)[0], first)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("exact", [True, False])
def test_coupled_step_on_the_kernels(exact, sweeps):
    """The coupled step (sums, rules, Newton steps, rewrite) with every phase on the Triton
    kernels, against the reference."""
    torch.manual_seed(torch.initial_seed() % 2 ** 31)
    index = torch.randint(0, 5, (12,))
    index[:5] = torch.arange(5)
    members = [(torch.randn(12, 3, 2, 2), 0, index, "conv"), (torch.randn(12), 0, index, "bn"),
               (torch.randn(7, 12).t().t(), 1, index, "linear")]
    mine = [(m[0].clone().to(DEVICE), *m[1:]) for m in members]
    ref = [(m[0].to(torch.float64), *m[1:]) for m in members]
    lams = dict(lam_l1=0.01, lam_group=0.05, lam_exclusive=0.05)
    fastprox.coupled_prox_(CoupledGroups([Slice(*m) for m in mine], 5), **lams, exact=exact)
    reference.coupled_prox_(ref, 5, **lams, exact=exact)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a[0].cpu().to(torch.float64), b[0], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("backend")
def test_coupled_thresholds_beyond_float32(sweeps):
    """lam_l1 and lam_group above float32's range, with an infinite element: the soft
    threshold keeps it infinite, its group keeps its values, the other groups go, no NaN."""
    w = torch.randn(6, 5)
    w[2, 1] = math.inf
    before = w.clone()
    for lams in (dict(lam_group=1e39), dict(lam_l1=1e39, lam_group=1e39)):
        x = before.clone().to(DEVICE)
        fastprox.coupled_prox_(CoupledGroups([Slice(x, 0, range(6))], 6), **lams)
        x = x.cpu()
        assert not x.isnan().any() and x[2, 1] == math.inf, lams
        assert (x[[0, 1, 3, 4, 5]] == 0).all()
        if "lam_l1" not in lams:
            assert torch.equal(x[2], before[2])
