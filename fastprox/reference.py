"""Pure-PyTorch reference of every fastprox operator: the oracle of the tests.

Written to mirror the formulas of ../shared/SPEC.md, not to be fast. Same signatures and the same
in-place semantics as the fused operators (``fastprox.ops``); correct in float64 (the tests run it
on a float64 copy), and it runs in the weight's own dtype otherwise (the benchmarks compare it,
eager and under torch.compile, with the kernels). The kernels never call it.
"""

from __future__ import annotations

import math

import torch

from ._checks import normalize_dim


def _value(lam) -> float:
    return float(lam)


def _reduced(weight: torch.Tensor, dim) -> list[int]:
    return normalize_dim(dim, weight, "reference")


def _group_size(weight: torch.Tensor, dims: list[int]) -> int:
    return math.prod(weight.shape[d] for d in dims)


def _as_groups(weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """A (num_groups, n) copy: kept dimensions first, each row one group."""
    kept = [d for d in range(weight.dim()) if d not in dims]
    return weight.permute(kept + dims).reshape(-1, _group_size(weight, dims))


def _from_groups(weight: torch.Tensor, dims: list[int], rows: torch.Tensor) -> torch.Tensor:
    """Writes (num_groups, n) rows back into weight (the inverse of _as_groups)."""
    kept = [d for d in range(weight.dim()) if d not in dims]
    weight.permute(kept + dims).copy_(rows.reshape([weight.shape[d] for d in kept + dims]))
    return weight


def group_norms(weight: torch.Tensor, dim=None) -> torch.Tensor:
    """||W_g||_2 per group, shaped like the kept dimensions."""
    dims = _reduced(weight, dim)
    if not dims:
        return weight.abs()
    return torch.linalg.vector_norm(weight, 2, dim=dims)


def _group_scale(norms: torch.Tensor, t: float) -> torch.Tensor:
    # s = 0 if ||W_g|| <= t else 1 - t/||W_g||; NaN norms fall through to a NaN scale, inf to 1.
    return torch.where(norms <= t, torch.zeros_like(norms), 1 - t / norms)


def group_shrink_(weight, lam, dim=None, *, size_weighted=True):
    """W_g <- s_g W_g,  s_g = max(1 - t/||W_g||, 0) with t = lam * (sqrt(n) if size_weighted)."""
    lam = _value(lam)
    if lam == 0 or weight.numel() == 0:
        return weight
    dims = _reduced(weight, dim)
    c = math.sqrt(_group_size(weight, dims)) if size_weighted else 1.0
    norms = torch.linalg.vector_norm(weight, 2, dim=dims, keepdim=True) if dims else weight.abs()
    return weight.mul_(_group_scale(norms, lam * c))


def shrink_magnitude(y: torch.Tensor, tau, out: torch.Tensor | None = None) -> torch.Tensor:
    """sign(y) max(|y| - tau, 0), into ``out`` if given. NaN in y or tau stays NaN (copysign,
    not sign(): torch.sign(nan) is 0; clamp propagates NaN)."""
    return torch.copysign(torch.clamp(y.abs() - tau, min=0), y, out=out)


def soft_threshold_(weight, lam):
    """w <- sign(w) max(|w| - lam, 0)."""
    lam = _value(lam)
    if lam == 0:
        return weight
    return weight.copy_(shrink_magnitude(weight, lam))


def sparse_group_shrink_(weight, lam_l1, lam_group, dim=None, *, size_weighted=True):
    """Soft threshold by lam_l1, then group shrink of the result by lam_group."""
    if _value(lam_l1) == 0 and _value(lam_group) == 0:
        return weight
    soft_threshold_(weight, lam_l1)
    return group_shrink_(weight, lam_group, dim, size_weighted=size_weighted)


def exclusive_threshold(a: torch.Tensor, lam: float, exact: bool = True) -> torch.Tensor:
    """tau per row of a (num_groups, n) tensor of magnitudes.

    exact: tau = max_k lam S_k / (1 + lam k), S_k the sum of the k largest a (k = 0 gives 0).
    inexact (CGES): tau = lam * sum(a).
    """
    if not exact:
        return lam * a.sum(dim=1)
    s = torch.sort(a, dim=1, descending=True).values.cumsum(dim=1)
    k = torch.arange(1, a.shape[1] + 1, dtype=a.dtype, device=a.device)
    # lam S_k / (1 + lam k), as S_k / (1/lam + k) so that a huge lam does not overflow.
    return (s / (1 / lam + k)).amax(dim=1).clamp(min=0)


def exclusive_shrink_(weight, lam, dim=None, *, exact=True):
    """W_g <- sign(W_g) max(|W_g| - tau_g, 0), tau_g the exclusive-lasso threshold."""
    lam = _value(lam)
    if lam == 0 or weight.numel() == 0:
        return weight
    dims = _reduced(weight, dim)
    rows = _as_groups(weight, dims)
    a = rows.abs()
    l1 = a.sum(dim=1)
    finite = torch.isfinite(l1)
    tau = exclusive_threshold(torch.where(finite[:, None], a, 0), lam, exact)
    shrunk = shrink_magnitude(rows, tau[:, None])
    # A NaN group becomes NaN; a group with an infinite value keeps its values.
    out = torch.where(l1.isnan()[:, None], torch.full_like(rows, math.nan),
                      torch.where(finite[:, None], shrunk, rows))
    return _from_groups(weight, dims, out)


def cges_shrink_(weight, lam_group, lam_exclusive, dim=None, *, size_weighted=True, exact=True):
    """Group shrink by lam_group, then exclusive shrink of the result by lam_exclusive."""
    group_shrink_(weight, lam_group, dim, size_weighted=size_weighted)
    return exclusive_shrink_(weight, lam_exclusive, dim, exact=exact)


def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True):
    """Per tensor: soft threshold by lam_l1, group shrink by lam_group, exclusive shrink by
    lam_exclusive (each skipped when its lam is 0). Per-tensor values come as lists."""
    def each(value, i):
        return value[i] if isinstance(value, list) else value

    for i, w in enumerate(weights):
        l1, lg, le = (_value(each(v, i)) for v in (lam_l1, lam_group, lam_exclusive))
        d, sw, ex = each(dim, i), each(size_weighted, i), each(exact, i)
        if l1 > 0:
            soft_threshold_(w, l1)
        if lg > 0:
            group_shrink_(w, lg, d, size_weighted=sw)
        if le > 0:
            exclusive_shrink_(w, le, d, exact=ex)
    return weights
