"""The exact exclusive-lasso prox: against the sort-based reference, against its optimality
conditions, and against CGES's inexact update."""

import pytest
import torch

import fastprox
from fastprox import reference


def _optimality_gap(v: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """Largest violation of the optimality conditions of one group (float64 1-D tensors).

    w = argmin 1/2 ||w - v||^2 + lam/2 ||w||_1^2  iff, with tau = lam ||w||_1:
    |v_i| - |w_i| = tau and sign(w_i) = sign(v_i) where w_i != 0;  |v_i| <= tau where w_i = 0.
    """
    tau = lam * w.abs().sum()
    nz = w != 0
    gap = torch.zeros(())
    if nz.any():
        gap = torch.maximum(gap, ((v[nz].abs() - w[nz].abs()) - tau).abs().max())
        assert (torch.sign(w[nz]) == torch.sign(v[nz])).all()
    if (~nz).any():
        gap = torch.maximum(gap, (v[~nz].abs() - tau).clamp(min=0).max())
    return gap.item()


@pytest.mark.parametrize("n", [1, 2, 3, 10, 97, 1000])
@pytest.mark.parametrize("lam", [1e-3, 0.05, 1.0, 30.0])
@pytest.mark.parametrize("dim", [1, 0])
def test_exact_prox_satisfies_optimality(n, lam, dim):
    groups = 7
    v = torch.randn(groups, n, dtype=torch.float64) * torch.rand(groups, 1, dtype=torch.float64) * 3
    v[:, :: max(1, n // 3)] *= 10  # a few large values: several Newton steps
    x = v.clone() if dim == 1 else v.t().clone(memory_format=torch.contiguous_format)
    fastprox.exclusive_shrink_(x, lam, dim=dim)
    w = x if dim == 1 else x.t()
    for g in range(groups):
        assert _optimality_gap(v[g], w[g], lam) < 1e-9 * (1 + v[g].abs().max().item())
    want = reference.exclusive_shrink_(v.clone(), lam, dim=1)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-12)


def test_exact_threshold_matches_sorted_formula_on_hard_cases():
    # Geometric magnitudes: the active set shrinks one element per Newton step.
    a = 2.0 ** -torch.arange(40, dtype=torch.float64)
    v = torch.stack([a, a.flip(0), -a, torch.ones(40, dtype=torch.float64)])
    for lam in (0.01, 0.5, 3.0, 1e4):
        got = fastprox.exclusive_shrink_(v.clone(), lam, dim=1)
        want = reference.exclusive_shrink_(v.clone(), lam, dim=1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_inexact_update_over_shrinks():
    # docs/SPEC.md: n = 10, lam = 1 wipes a group the exact prox keeps.
    v = torch.ones(1, 10, dtype=torch.float64)
    exact = fastprox.exclusive_shrink_(v.clone(), 1.0, dim=1)
    inexact = fastprox.exclusive_shrink_(v.clone(), 1.0, dim=1, exact=False)
    torch.testing.assert_close(exact, torch.full_like(v, 1 - 10 / 11))
    assert (inexact == 0).all()
    # The inexact threshold is an upper bound of the exact one on random groups.
    v = torch.randn(50, 30, dtype=torch.float64)
    a, b = fastprox.exclusive_shrink_(v.clone(), 0.05), fastprox.exclusive_shrink_(v.clone(), 0.05, exact=False)
    assert (b.abs() <= a.abs() + 1e-15).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_prox_low_precision_near_optimal(dtype):
    v = torch.randn(64, 50).to(dtype)
    w = fastprox.exclusive_shrink_(v.clone(), 0.1).double()
    vd = v.double()
    objective = lambda x: 0.5 * ((x - vd) ** 2).sum(1) + 0.05 * x.abs().sum(1) ** 2
    best = reference.exclusive_shrink_(vd.clone(), 0.1)
    assert (objective(w) - objective(best) <= 1e-2 * (1 + objective(best))).all()
