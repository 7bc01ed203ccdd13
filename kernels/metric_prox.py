"""foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted, exact)
on CUDA: the fused step in an Adam step's diagonal metric. Per weight i with (l1, lg, le) =
lams[i] and (s, eps, lr) = metric[i]:

    d = (sqrt(v * s) + eps) / lr                  (v = moments[i], s = 1 / (1 - beta2^t))
    W <- metric soft threshold by l1 / d, metric group step by t = lg * c, metric exclusive
         step by le (exact threshold, or CGES's bound)                    (a lam of 0: skipped)

Weights are bucketed as for foreach_prox_ (kernels/launch.py), each bucket one launch of
``metric_kernel`` (kernels/group_engine.py): a group that fits the tile is read once from the
weight and the moment into registers, solved there by Newton's method, written once. The tables
are read on the host (every check before any launch): the step is not captured in CUDA graphs.
Contract: docs/SPEC.md; reference: fastprox/reference.py (foreach_metric_prox_op); CPU:
csrc/cpu/metric_prox.cpp.
"""

from __future__ import annotations

import math

import torch

from . import launch

_OP = "foreach_metric_prox_"


def _rows(table, n: int, name: str) -> list[list[float]]:
    if not (isinstance(table, torch.Tensor) and table.dtype == torch.float64
            and table.numel() == 3 * n):
        raise ValueError(f"{_OP}: {name} must be a float64 tensor of 3 * len(weights) values")
    return table.reshape(n, 3).tolist()


def foreach_metric_prox_(weights, moments, lams, metric, dims, dim_counts, size_weighted,
                         exact, names=None):
    op = _OP
    n = len(weights)
    if len(moments) != n or len(dim_counts) != n or len(size_weighted) != n or len(exact) != n:
        raise ValueError(f"{op}: moments, dim_counts, size_weighted and exact need one entry "
                         "per weight")
    if names is not None and len(names) != n:
        raise ValueError(f"{op}: names needs one entry per weight")
    label = (lambda i: names[i]) if names is not None else (lambda i: f"moments[{i}]")
    lam_rows, metric_rows = _rows(lams, n, "lams"), _rows(metric, n, "metric")
    tensor_dims = launch.split_dims(weights, dims, dim_counts)
    for i, (w, v) in enumerate(zip(weights, moments)):
        if v.shape != w.shape:
            raise ValueError(f"{op}: {label(i)} has shape {tuple(v.shape)}, expected "
                             f"{tuple(w.shape)}")
        if v.device != w.device or not v.is_floating_point():
            raise ValueError(f"{op}: {label(i)} must be a floating tensor on {w.device}")
        if not all(math.isfinite(x) and x >= 0 for x in lam_rows[i]):
            raise ValueError(f"{op}: lams[{i}] must be finite numbers >= 0")
        s, eps, lr = metric_rows[i]
        if not (all(math.isfinite(x) for x in (s, eps, lr)) and s >= 0 and eps >= 0 and lr > 0):
            raise ValueError(f"{op}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
    used = [i for i in range(n) if weights[i].numel() and any(lam_rows[i])]
    ranges = [launch.address_range(w) for w in weights]
    for i in used:  # the moments used: apart from the weights, finite and >= 0
        lo, hi = launch.address_range(moments[i])
        for j, (wlo, whi) in enumerate(ranges):
            if lo < whi and wlo < hi:
                raise ValueError(f"{op}: {label(i)} shares memory with weights[{j}], which the "
                                 "step writes")
    if used:  # one reduction per moment, one read on the host for all of them
        bounds = torch.stack([torch.stack(torch.aminmax(moments[i])).double()
                              for i in used]).tolist()
        for i, (lo, hi) in zip(used, bounds):
            if not (lo >= 0 and hi < math.inf):
                raise ValueError(f"{op}: {label(i)} has negative, NaN or infinite entries (a "
                                 "second moment is finite and >= 0); the optimizer's state is "
                                 "damaged: check the loss and gradients for NaN/inf, or reload "
                                 "a checkpoint")
    launch.metric_([(w, v, d, sw, ex) for w, v, d, sw, ex in
                    zip(weights, moments, tensor_dims, size_weighted, exact)],
                   lam_rows, metric_rows)
