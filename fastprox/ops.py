"""The operators: the contract of each (formula, groups, edge cases), checked arguments, and the
call into the op library (C++ on the CPU: csrc/cpu/<op>.cpp; reference: fastprox/reference.py).

The mathematical contract is ../shared/SPEC.md; these docstrings restate it per operator.
"""

from __future__ import annotations

import torch

from . import _checks
from ._registry import ops

_DIM = """\
    dim: the dimensions reduced inside a group, an int or a tuple (negative allowed), exactly as
        in ``torch.linalg.vector_norm``; the remaining dimensions index the groups. ``None``
        (default): every dimension but the first. For an ``nn.Linear`` weight ``(out, in)``:
        ``dim=1`` (default) makes a group of each row (an output unit), ``dim=0`` of each column
        (an input feature). For a conv weight ``(O, I, kh, kw)``: ``(1, 2, 3)`` (default) groups
        each filter (output channel), ``(0, 2, 3)`` each input channel, ``0`` each input
        position across all filters (CGES). An empty tuple makes every element its own group."""

_EDGES = """\
    Edge cases: every ``lam`` = 0 leaves ``weight`` bit-identical; a group containing NaN
    becomes all NaN; a group of infinite norm keeps its values; a zero group stays zero (never
    NaN). Sums are accumulated in float32 for float16/bfloat16, in the weight's type otherwise.
    Thresholds are Python numbers or 0-d tensors (a tensor does not recompile under
    ``torch.compile`` when its value changes); negative, NaN or infinite ones raise ValueError
    before the weight is touched. Works in place on any strided view (``w.t()``, ``w[:, ::2]``)."""


def _doc(text: str):
    def attach(fn):
        fn.__doc__ = text.format(dim=_DIM, edges=_EDGES)
        return fn

    return attach


def _check_flag(value, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def _prepare(fn: str, weight, dim, *thresholds, grouped: bool = True, in_place: bool = True):
    """Checks weight and dim, converts thresholds ((name, value) pairs) to 0-d tensors."""
    _checks.check_weight(weight, fn)
    if in_place:
        _checks.check_grad(weight, fn)
    dims = _checks.normalize_dim(dim, weight, fn) if grouped else None
    lams = [_checks.as_threshold(value, name, weight, fn) for name, value in thresholds]
    return dims, lams


@_doc("""Per-group Euclidean norms ``||W_g||_2``.

    Returns a new tensor shaped like the kept dimensions of ``weight`` (those not in ``dim``),
    of ``weight``'s dtype. Differentiable: the gradient at a zero group is 0 (never NaN).

{dim}

    Example::

        >>> w = torch.randn(128, 64)          # nn.Linear(64, 128).weight
        >>> fastprox.group_norms(w).shape      # one norm per output unit (row)
        torch.Size([128])
        >>> fastprox.group_norms(w, dim=0).shape   # one per input feature (column)
        torch.Size([64])
""")
def group_norms(weight: torch.Tensor, dim=None) -> torch.Tensor:
    dims, _ = _prepare("group_norms", weight, dim, in_place=False)
    return ops.group_norms(weight, dims)


@_doc("""Group lasso prox, in place: ``Omega(W) = lam * sum_g c ||W_g||_2``.

    With ``t = lam * c`` (``c = sqrt(n)`` when ``size_weighted``, else 1; ``n`` = elements per
    group)::

        W_g <- s_g * W_g,   s_g = 0 if ||W_g|| <= t  else  1 - t / ||W_g||

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.group_shrink_(layer.weight, lr * lam, dim=0)``
    after ``optimizer.step()`` removes whole input features.
""")
def group_shrink_(weight: torch.Tensor, lam, dim=None, *, size_weighted: bool = True):
    fn = "group_shrink_"
    dims, (lam_t,) = _prepare(fn, weight, dim, ("lam", lam))
    ops.group_shrink_(weight, lam_t, dims, _check_flag(size_weighted, "size_weighted", fn))
    return weight


@_doc("""Lasso prox (soft threshold), in place: ``Omega(W) = lam * ||W||_1``::

        w <- sign(w) * max(|w| - lam, 0)     elementwise

    NaN stays NaN and +-inf stays +-inf; ``lam`` = 0 leaves ``weight`` bit-identical. ``lam`` is
    a Python number or a 0-d tensor, finite and >= 0. Works in place on any strided view.

    Returns ``weight``. Example: ``fastprox.soft_threshold_(w, 1e-3)``.
""")
def soft_threshold_(weight: torch.Tensor, lam):
    _, (lam_t,) = _prepare("soft_threshold_", weight, None, ("lam", lam), grouped=False)
    ops.soft_threshold_(weight, lam_t)
    return weight


@_doc("""Sparse group lasso prox, in place:
    ``Omega(W) = lam_l1 * ||W||_1 + lam_group * sum_g c ||W_g||_2``.

    Its exact prox is the composition (Friedman, Hastie, Tibshirani 2010), fused in one pass::

        V   <- sign(W) * max(|W| - lam_l1, 0)
        W_g <- s_g * V_g,   s_g = 0 if ||V_g|| <= t  else  1 - t / ||V_g||,   t = lam_group * c

    with ``c = sqrt(n)`` when ``size_weighted``, else 1.

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.sparse_group_shrink_(w, 1e-4, 1e-3, dim=0)``.
""")
def sparse_group_shrink_(weight: torch.Tensor, lam_l1, lam_group, dim=None, *,
                         size_weighted: bool = True):
    fn = "sparse_group_shrink_"
    dims, (l1, lg) = _prepare(fn, weight, dim, ("lam_l1", lam_l1), ("lam_group", lam_group))
    ops.sparse_group_shrink_(weight, l1, lg, dims, _check_flag(size_weighted, "size_weighted", fn))
    return weight


@_doc("""Exclusive lasso prox, in place: ``Omega(W) = (lam / 2) * sum_g ||W_g||_1 ** 2``.

    Sparsity *within* each group (the groups compete for nonzeros). Per group, ``a = |W_g|``::

        W_g <- sign(W_g) * max(a - tau, 0)

    ``exact=True``: ``tau`` solves ``tau = lam * sum_i max(a_i - tau, 0)``, i.e.
    ``tau = max_k lam * S_k / (1 + lam * k)`` with ``S_k`` the sum of the ``k`` largest ``a`` —
    found without sorting (Newton's method from 0, exact in a handful of steps).
    ``exact=False``: CGES's published update ``tau = lam * ||W_g||_1``, an upper bound that always
    over-shrinks; only for reproducing CGES.

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.exclusive_shrink_(w, 1e-2, dim=0)``.
""")
def exclusive_shrink_(weight: torch.Tensor, lam, dim=None, *, exact: bool = True):
    fn = "exclusive_shrink_"
    dims, (lam_t,) = _prepare(fn, weight, dim, ("lam", lam))
    ops.exclusive_shrink_(weight, lam_t, dims, _check_flag(exact, "exact", fn))
    return weight


@_doc("""CGES step (Yoon & Hwang 2017), in place: group shrink, then exclusive shrink of the
    result, fused into one pass::

        W <- exclusive_shrink_(group_shrink_(W, lam_group, dim, size_weighted=size_weighted),
                               lam_exclusive, dim, exact=exact)

    ``size_weighted=False, exact=False`` is the published update (with ``dim=0``: groups are the
    outgoing weights of an input unit / input position).

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.cges_shrink_(w, 1e-3, 1e-4, dim=0)``.
""")
def cges_shrink_(weight: torch.Tensor, lam_group, lam_exclusive, dim=None, *,
                 size_weighted: bool = True, exact: bool = True):
    fn = "cges_shrink_"
    dims, (lg, le) = _prepare(fn, weight, dim, ("lam_group", lam_group),
                              ("lam_exclusive", lam_exclusive))
    ops.cges_shrink_(weight, lg, le, dims, _check_flag(size_weighted, "size_weighted", fn),
                     _check_flag(exact, "exact", fn))
    return weight
