"""Calls of the CUDA entries of fastprox.kernels: through the public API on a GPU, directly (the
same functions, with the arguments fastprox/ops.py would pass) under the interpreter."""

from __future__ import annotations

import os

import torch

import fastprox
from fastprox import _checks
from fastprox import kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
DEVICE = "cpu" if INTERPRET else "cuda"

# op -> (threshold names, flags in schema order)
SCHEMA = {
    "group_shrink_": (("lam",), ("size_weighted",)),
    "soft_threshold_": (("lam",), ()),
    "sparse_group_shrink_": (("lam_l1", "lam_group"), ("size_weighted",)),
    "exclusive_shrink_": (("lam",), ("exact",)),
    "cges_shrink_": (("lam_group", "lam_exclusive"), ("size_weighted", "exact")),
}
DEFAULTS = dict(size_weighted=True, exact=True)


def call(op: str, weight, lams, dim=None, **kwargs):
    """fastprox.<op>(weight, *lams, dim, **kwargs) served by the Triton kernels."""
    names, flags = SCHEMA[op]
    if not INTERPRET:
        fn = getattr(fastprox, op)
        return fn(weight, *lams, **kwargs) if op == "soft_threshold_" else \
            fn(weight, *lams, dim, **kwargs)
    _checks.check_weight(weight, op)
    lam_t = [_checks.as_threshold(v, n, weight, op) for n, v in zip(names, lams)]
    args = [weight, *lam_t]
    if op != "soft_threshold_":
        args.append(_checks.normalize_dim(dim, weight, op))
    args += [kwargs.get(f, DEFAULTS[f]) for f in flags]
    kernels.ENTRIES[op](*args)
    return weight


def group_norms(weight, dim=None):
    if not INTERPRET:
        return fastprox.group_norms(weight, dim)
    return kernels.group_norms(weight, _checks.normalize_dim(dim, weight, "group_norms"))


def foreach_prox_(weights, **kwargs):
    if not INTERPRET:
        return fastprox.foreach_prox_(weights, **kwargs)
    # fastprox.foreach_prox_ with the op call swapped for the CUDA entry
    saved = fastprox.ops.ops

    class _Ops:
        foreach_prox_ = staticmethod(kernels.foreach_prox_)

    fastprox.ops.ops = _Ops
    try:
        return fastprox.foreach_prox_(weights, **kwargs)
    finally:
        fastprox.ops.ops = saved
