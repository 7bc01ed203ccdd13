"""The call into the fused in-place step (``torch.ops.fastprox.foreach_prox_``) from checked
arguments: the thresholds gathered into the op's (T, 3) float64 table. Shared by the public
operators (fastprox/ops.py) and the sharded path (fastprox/distributed.py)."""

from __future__ import annotations

import array
import math

import torch

from . import _checks
from ._registry import ops
from .operators import COLUMNS


def lam_table(weights, columns, fn: str, names) -> torch.Tensor:
    """columns: per column of the fused step, one threshold (number or 0-d tensor) per weight.
    names[k]: the caller's name of column k. Values are checked by the kernel."""
    count = len(weights)
    tensors = [v for c in columns for v in c if isinstance(v, torch.Tensor)]
    if not tensors:  # plain numbers: one small tensor, no per-threshold overhead
        return numbers_table([c[i] for i in range(count) for c in columns])
    indexed = (lambda k, i: f"{names[k]}[{i}]") if count > 1 else (lambda k, i: names[k])
    device = weights[0].device
    # Thresholds held on the GPU stay there (no synchronisation; a CUDA graph replays with their
    # current values): numbers join them by a fill on the device. Otherwise the table is on the
    # CPU.
    on = device if any(v.device == device != torch.device("cpu") for v in tensors) else None
    cells = []
    for i in range(count):
        for k in range(3):
            value = columns[k][i]
            if isinstance(value, torch.Tensor):
                value = _checks.as_threshold(value, indexed(k, i), weights[0], fn)
                cells.append(value.to(device=on or "cpu", dtype=torch.float64))
            else:
                _checks.check_number(value, indexed(k, i), fn)
                cells.append(torch.full((), float(value), dtype=torch.float64, device=on))
    return torch.stack(cells)


def numbers_table(values) -> torch.Tensor:
    """The flat float64 table of thresholds given as Python numbers (3 per weight)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float64)
    # from a buffer: a quarter of the cost of torch.tensor(list) (the tensor keeps the array)
    return torch.frombuffer(array.array("d", values), dtype=torch.float64)


def host_number(value, name: str, weight, fn: str):
    """A threshold a preset was given, as a Python float where reading it is cheap and safe:
    a 0-d CPU tensor outside torch.compile (reading it inside a graph would break the graph;
    one on the GPU would synchronise). Anything else is returned as given."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        return float(_checks.as_threshold(value, name, weight, fn))
    return value


def preset_table(weight, cells, fn: str, names) -> tuple[torch.Tensor, bool]:
    """The table of a preset call (cells[k]: the threshold of column k; 0.0 for a column the
    preset never sets, whose names[k] is ''), and whether the kernel must check (and name) its
    values: Python floats and ints are checked here, where it costs least."""
    if all(type(v) is float or type(v) is int for v in cells):
        for value, name in zip(cells, names):
            if name and not 0 <= value < math.inf:
                raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value}")
        return numbers_table(cells), False
    # other numbers (numpy, SymFloat), tensors on the GPU, or any tensor under torch.compile
    # (host_number leaves those as given): a table checked by the kernel
    for value, name in zip(cells, names):
        if name and not isinstance(value, torch.Tensor):
            _checks.check_number(value, name, fn)
    return lam_table([weight], [[v] for v in cells], fn, names), True


def prox_(weights, columns, dims, size_weighted, exact) -> None:
    """The fused step on checked weights, as foreach_prox_ (its names in errors); ``dims``
    normalized per weight; ``columns``: per column, one threshold per weight."""
    if not weights:
        return
    ops.foreach_prox_(list(weights), lam_table(weights, columns, "foreach_prox_", COLUMNS),
                      [d for ds in dims for d in ds], [len(ds) for ds in dims],
                      list(size_weighted), list(exact))
