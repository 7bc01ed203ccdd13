"""The call into the fused in-place step (``torch.ops.fastprox.foreach_prox_``) from checked
arguments: the thresholds gathered into the op's (T, 3) float64 table. Shared by the public
operators (fastprox/ops.py) and the sharded path (fastprox/distributed.py)."""

from __future__ import annotations

import torch

from . import _checks
from ._registry import ops
from .operators import COLUMNS


def _on_device(value, name: str, weight: torch.Tensor, fn: str) -> torch.Tensor:
    """A threshold as a float64 0-d tensor on the weight's (GPU) device, without a copy from
    host memory (not allowed inside CUDA graph capture)."""
    value = _checks.as_threshold(value, name, weight, fn)
    if value.device == weight.device:
        return value.to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=weight.device)


def lam_table(weights, columns, fn: str, names) -> torch.Tensor:
    """columns: per column of the fused step, one threshold (number or 0-d tensor) per weight.
    names[k]: the caller's name of column k. Values are checked by the kernel."""
    count = len(weights)
    tensors = [v for c in columns for v in c if isinstance(v, torch.Tensor)]
    if not tensors:  # plain numbers: one small tensor, no per-threshold overhead
        return torch.tensor([[float(c[i]) for c in columns] for i in range(count)],
                            dtype=torch.float64)
    indexed = (lambda k, i: f"{names[k]}[{i}]") if count > 1 else (lambda k, i: names[k])
    device = weights[0].device
    if any(v.device == device != torch.device("cpu") for v in tensors):
        # Thresholds held on the GPU stay there (no synchronisation; a CUDA graph replays with
        # their current values): numbers join them by a fill on the device.
        cell = lambda k, i: _on_device(columns[k][i], indexed(k, i), weights[0], fn)  # noqa
    else:
        cell = lambda k, i: _checks.as_threshold(  # noqa: E731
            columns[k][i], indexed(k, i), weights[0], fn).to("cpu", torch.float64)
    return torch.stack([torch.stack([cell(k, i) for k in range(3)]) for i in range(count)])


def prox_(weights, columns, dims, size_weighted, exact, fn: str = "foreach_prox_",
          names=COLUMNS) -> None:
    """The fused step on checked weights; ``dims`` normalized per weight; ``columns``: per
    column, one threshold per weight; ``names``: the caller's name of each column ('' for one
    it never sets)."""
    if not weights:
        return
    ops.foreach_prox_(list(weights), lam_table(weights, columns, fn, names),
                      [d for ds in dims for d in ds], [len(ds) for ds in dims],
                      list(size_weighted), list(exact), fn, list(names))
