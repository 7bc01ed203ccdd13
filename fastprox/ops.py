"""The operators: the contract of each (formula, groups, edge cases), checked arguments, and the
call into the op library (C++ on the CPU: csrc/cpu/<op>.cpp; reference: fastprox/reference.py).

The mathematical contract is ../shared/SPEC.md; these docstrings restate it per operator.
"""

from __future__ import annotations

import numbers

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


def has_kernels(device) -> bool:
    """Whether fastprox's fused kernels serve tensors on ``device``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastprox::foreach_prox_", key)


def _sharded():
    """fastprox.distributed, the path of DTensor weights (imported when one is seen)."""
    from . import distributed

    return distributed


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
    if _checks.is_dtensor(weight):
        return _sharded().group_norms(weight, dim)
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
    if _checks.is_dtensor(weight):
        return _sharded().prox_(weight, lam_group=lam, dim=dim, size_weighted=size_weighted)
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
    if _checks.is_dtensor(weight):
        return _sharded().prox_(weight, lam_l1=lam)
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
    if _checks.is_dtensor(weight):
        return _sharded().prox_(weight, lam_l1=lam_l1, lam_group=lam_group, dim=dim,
                                size_weighted=size_weighted)
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
    if _checks.is_dtensor(weight):
        return _sharded().prox_(weight, lam_exclusive=lam, dim=dim, exact=exact)
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
    if _checks.is_dtensor(weight):
        return _sharded().prox_(weight, lam_group=lam_group, lam_exclusive=lam_exclusive,
                                dim=dim, size_weighted=size_weighted, exact=exact)
    fn = "cges_shrink_"
    dims, (lg, le) = _prepare(fn, weight, dim, ("lam_group", lam_group),
                              ("lam_exclusive", lam_exclusive))
    ops.cges_shrink_(weight, lg, le, dims, _check_flag(size_weighted, "size_weighted", fn),
                     _check_flag(exact, "exact", fn))
    return weight


def _per_tensor(value, name: str, count: int, fn: str, is_item) -> list:
    """One value per tensor: a single item is repeated; a list/tuple (or 1-D tensor) is taken
    as given and must have one entry per tensor."""
    if is_item(value):
        return [value] * count
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = list(value.unbind())
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{fn}: {name} must be a single value or a list with one per weight, got "
                        f"{type(value).__name__}")
    if len(value) != count:
        raise ValueError(f"{fn}: {name} has {len(value)} entries for {count} weights")
    for i, item in enumerate(value):
        if not is_item(item):
            raise TypeError(f"{fn}: {name}[{i}] has the wrong type: {type(item).__name__}")
    return list(value)


def _device_threshold(value, name: str, weight: torch.Tensor, fn: str) -> torch.Tensor:
    """A threshold as a float64 0-d tensor on the weight's (GPU) device, without a copy from
    host memory (not allowed inside CUDA graph capture)."""
    value = _checks.as_threshold(value, name, weight, fn)
    if value.device == weight.device:
        return value.to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=weight.device)


def _is_threshold(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 0) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool))


def _is_dim_spec(value) -> bool:
    return value is None or isinstance(value, (numbers.Integral, tuple, torch.Size))


def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True):
    """One proximal step on every tensor of a list, in one call (one parallel region on the CPU).

    Per tensor ``W`` (with its own thresholds, ``dim``, ``size_weighted`` and ``exact``)::

        W <- soft_threshold(W, lam_l1)                        (skipped when lam_l1 = 0)
        W <- group shrink by lam_group * c over dim's groups  (skipped when lam_group = 0)
        W <- exclusive shrink by lam_exclusive                (skipped when lam_exclusive = 0)

    so one call does what ``soft_threshold_``, ``group_shrink_``, ``sparse_group_shrink_``,
    ``exclusive_shrink_`` and ``cges_shrink_`` do on each tensor, with bitwise the same result.
    This is the step for a whole model: a call per small tensor costs more than its work.

    Args:
        weights: a list of tensors on one device, no two sharing memory (views of one storage
            whose address ranges interleave, like ``w[:, :3]`` and ``w[:, 3:]``, are refused).
        lam_l1, lam_group, lam_exclusive: a number or 0-d tensor for every tensor, or a list (or
            1-D tensor) with one per tensor; finite and >= 0.
        dim: one ``dim`` for every tensor (None, an int or a tuple), or a **list** with one per
            tensor; as in ``group_shrink_`` (reduced dimensions; None: all but the first).
        size_weighted: ``c = sqrt(n)`` (True) or 1; a bool or a list of bools.
        exact: the exact exclusive threshold (True) or CGES's bound; a bool or a list of bools.

{edges}

    Returns ``weights``. Example::

        fastprox.foreach_prox_([l.weight for l in linears], lam_group=lr * lam, dim=0)
    """
    fn = "foreach_prox_"
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{fn}: weights must be a list or tuple of tensors, got "
                        f"{type(weights).__name__}")
    if any(_checks.is_dtensor(w) for w in weights):
        return _sharded().foreach_prox_(weights, lam_l1=lam_l1, lam_group=lam_group,
                                        lam_exclusive=lam_exclusive, dim=dim,
                                        size_weighted=size_weighted, exact=exact)
    count = len(weights)
    for i, w in enumerate(weights):
        _checks.check_weight(w, fn, f"weights[{i}]")
        _checks.check_grad(w, fn, f"weights[{i}]")
        if w.device != weights[0].device:
            raise ValueError(f"{fn}: weights[{i}] is on {w.device} but weights[0] is on "
                             f"{weights[0].device}; call once per device")
    dims = _per_tensor(dim, "dim", count, fn, _is_dim_spec)
    dims = [_checks.normalize_dim(d, w, f"{fn}: weights[{i}]") for i, (d, w) in
            enumerate(zip(dims, weights))]
    names = ("lam_l1", "lam_group", "lam_exclusive")
    columns = [_per_tensor(value, name, count, fn, _is_threshold) for name, value in
               zip(names, (lam_l1, lam_group, lam_exclusive))]
    flags = [_per_tensor(value, name, count, fn, lambda v: isinstance(v, bool))
             for name, value in (("size_weighted", size_weighted), ("exact", exact))]
    if count == 0:
        return weights
    device = weights[0].device
    if any(isinstance(v, torch.Tensor) and v.device == device != torch.device("cpu")
           for c in columns for v in c):
        # Thresholds held on the GPU stay there (no synchronisation; a CUDA graph replays
        # with their current values): numbers join them by a fill on the device.
        lams = torch.stack([torch.stack([
            _device_threshold(c[i], f"{name}[{i}]", weights[0], fn)
            for name, c in zip(names, columns)]) for i in range(count)])
    elif any(isinstance(v, torch.Tensor) for c in columns for v in c):
        lams = torch.stack([torch.stack([
            _checks.as_threshold(c[i], f"{name}[{i}]", weights[0], fn).to("cpu", torch.float64)
            for name, c in zip(names, columns)]) for i in range(count)])
    else:  # plain numbers: one small tensor, no per-tensor overhead (values checked in C++)
        lams = torch.tensor([[float(c[i]) for c in columns] for i in range(count)],
                            dtype=torch.float64)
    ops.foreach_prox_(list(weights), lams, [d for ds in dims for d in ds],
                      [len(ds) for ds in dims], flags[0], flags[1])
    return weights


foreach_prox_.__doc__ = foreach_prox_.__doc__.format(edges=_EDGES)
