"""The phase ops on CUDA, for steps whose groups lie in several places (fastprox/_phases.py:
coupled groups across tensors, groups across shards). Per weight W, its groups given by dims,
y = soft(W, lam_l1):

    foreach_group_sums(Ws, dims, dim_counts, lam_l1, what) -> per W, (k, *kept): per group,
        what & 1: sum y^2; what & 2: sum |y| and count(|y| > 0)   (k rows, in that order)
    foreach_group_sums_above(Ws, dims, dim_counts, lam_l1, scales, taus) -> per W, (2, *kept):
        per group, with m = |y| * scale_g (None: 1), the sum and the count of the m > tau_g
    foreach_group_rewrite_(Ws, dims, dim_counts, lam_l1, scales, taus): per group,
        W_g <- sign(y) * max(|y| * scale_g - tau_g, 0)               (None: 1, 0)

Sums in float32 (float64 for float64 weights); per-group values shaped like the kept
dimensions, on the weights' device. Weights are bucketed as for the step (kernels/launch.py),
one launch of ``phase_kernel`` (kernels/group_engine.py) per bucket: one read of each weight
for the sums, one read and one write for the rewrite; every check before any launch. Contract:
docs/SPEC.md; reference: fastprox/reference.py; CPU: csrc/cpu/group_phases.cpp.
"""

from __future__ import annotations

import math

import torch

from . import launch
from .layout import to_kept_shape


def _check(op, weights, dims, dim_counts, lam_l1, values=(), needed=None):
    """The tables of a phase op checked (its weights arrive checked: fastprox/_triton.py),
    before anything runs; (layouts, l1s, dims), the layouts of the ``needed`` weights only (all
    by default)."""
    n = len(weights)
    if len(dim_counts) != n or len(lam_l1) != n:
        raise ValueError(f"{op}: dim_counts and lam_l1 need one entry per weight")
    for name, vs in values:
        if len(vs) != n:
            raise ValueError(f"{op}: {name} need one entry per weight")
    tensor_dims = launch.split_dims(weights, dims, dim_counts)
    l1s = []
    for i, lam in enumerate(lam_l1):
        lam = float(lam)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"{op}: lam_l1[{i}] must be a finite number >= 0, got {lam}")
        l1s.append(lam)
    for name, vs in values:
        for i, (w, d, v) in enumerate(zip(weights, tensor_dims, vs)):
            if v is None:
                continue
            groups = math.prod(s for k, s in enumerate(w.shape) if k not in d)
            if not isinstance(v, torch.Tensor) or v.numel() != groups:
                got = v.numel() if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{op}: {name}[{i}] has {got} values for {groups} groups")
            if v.device != w.device:
                raise ValueError(f"{op}: {name}[{i}] is on {v.device} but weights[{i}] is on "
                                 f"{w.device}")
    return launch.phase_layouts(list(zip(weights, tensor_dims)), needed), l1s, tensor_dims


def _values(weights, layouts, scales, taus):
    """Per weight, its (scale, tau) in group order (None where not given)."""
    out = []
    for w, lay, s, t in zip(weights, layouts, scales, taus):
        if lay is None:
            out.append(None)
            continue
        out.append(tuple(None if v is None else launch.to_group_order(v, w, lay)
                         for v in (s, t)))
    return out


def _kept(sums, weights, tensor_dims, layouts, rows):
    """Per weight, its sums in group order -> (k, *kept) in logical order (zeros for a weight
    without groups or elements)."""
    out = []
    for w, d, lay, part in zip(weights, tensor_dims, layouts, sums):
        kept = [s for k, s in enumerate(w.shape) if k not in d]
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        if lay is None:
            out.append(torch.zeros([len(rows), *kept], dtype=acc, device=w.device))
            continue
        order = list(lay.kept_in_group_order)
        if order == sorted(order):  # group order is the logical order: a view of the rows
            out.append(part[rows[0]:rows[-1] + 1].view([len(rows), *kept]))
        else:
            out.append(torch.stack([to_kept_shape(part[r], w, d, lay) for r in rows]))
    return out


def foreach_group_sums(weights, dims, dim_counts, lam_l1, what):
    op = "foreach_group_sums"
    if what not in (1, 2, 3):
        raise ValueError(f"{op}: what must be 1, 2 or 3, got {what}")
    layouts, l1s, tensor_dims = _check(op, weights, dims, dim_counts, lam_l1)
    sums = launch.phase_(list(weights), layouts, l1s, launch.PHASE_SUMS)
    rows = ([0] if what & 1 else []) + ([1, 2] if what & 2 else [])
    return _kept(sums, weights, tensor_dims, layouts, rows)


def foreach_group_sums_above(weights, dims, dim_counts, lam_l1, scales, taus):
    op = "foreach_group_sums_above"
    if any(t is None for t in taus):
        raise ValueError(f"{op}: taus need a tensor per weight")
    layouts, l1s, tensor_dims = _check(op, weights, dims, dim_counts, lam_l1,
                                       (("scales", scales), ("taus", taus)))
    sums = launch.phase_(list(weights), layouts, l1s, launch.PHASE_ABOVE,
                         _values(weights, layouts, scales, taus))
    return _kept(sums, weights, tensor_dims, layouts, [0, 1])


def foreach_group_rewrite_(weights, dims, dim_counts, lam_l1, scales, taus):
    op = "foreach_group_rewrite_"
    # nothing to do for a weight without a scale, a threshold or lam_l1: bit-identical, and
    # not analyzed (no working copy)
    needed = [s is not None or t is not None or float(lam) > 0
              for s, t, lam in zip(scales, taus, lam_l1)]
    layouts, l1s, _ = _check(op, weights, dims, dim_counts, lam_l1,
                             (("scales", scales), ("taus", taus)), needed)
    launch.phase_(list(weights), layouts, l1s, launch.PHASE_REWRITE,
                  _values(weights, layouts, scales, taus))
