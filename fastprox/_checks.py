"""Argument checks of the public API (every one runs before any memory is touched) and the
per-tensor argument helpers of the list operators.

They look only at metadata (types, dtypes, shapes, devices), so they cost nothing under
torch.compile. The value of a threshold (negative, NaN, inf) is checked by the kernel, which
reads it before touching the weight: a tensor threshold cannot be read here without a graph
break (and, on a GPU, a synchronisation).
"""

from __future__ import annotations

import numbers
import sys
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_dtensor(value) -> bool:
    """Whether ``value`` is a DTensor, without importing torch.distributed.tensor (slow to
    import): a program that made one has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def check_weight(weight, fn: str, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.layout != torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {weight.layout}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float32, float64, float16 or bfloat16, got {weight.dtype}"
        )
    if weight.dim() == 0:
        raise ValueError(f"{fn}: {name} must have at least one dimension, got a 0-d tensor")


def normalize_dim(dim, weight: torch.Tensor, fn: str) -> list[int]:
    """The reduced dimensions as sorted non-negative ints; None: every dimension but the first."""
    ndim = weight.dim()
    if dim is None:
        return list(range(1, ndim))
    dims: Sequence = (dim,) if not isinstance(dim, (tuple, list, torch.Size)) else dim
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{fn}: dim must be an int or a tuple of ints, got {dim!r}")
        d = int(d)
        if not -ndim <= d < ndim:
            raise ValueError(
                f"{fn}: dim {d} is out of range for a weight with {ndim} dimensions "
                f"(expected in [{-ndim}, {ndim - 1}])"
            )
        d %= ndim
        if d in out:
            raise ValueError(f"{fn}: dim {dim!r} names dimension {d} more than once")
        out.append(d)
    return sorted(out)


def as_threshold(value, name: str, weight: torch.Tensor, fn: str) -> torch.Tensor:
    """A threshold as the 0-d tensor the ops take; its value is checked by the kernel."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{fn}: {name} must be a number or a 0-d tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be a real number, got dtype {value.dtype}")
        if value.device.type != "cpu" and value.device != weight.device:
            raise ValueError(f"{fn}: {name} is on {value.device} but weight is on "
                             f"{weight.device}; use a CPU tensor or the weight's device")
        return value
    check_number(value, name, fn)
    return torch.tensor(value, dtype=torch.float64)


def check_number(value, name: str, fn: str) -> None:
    """A threshold given as a Python number (its value is checked by the kernel)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat,
                                                         torch.SymInt)):
        raise TypeError(f"{fn}: {name} must be a number or a 0-d tensor, got "
                        f"{type(value).__name__}")


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may be one place in memory. Views made by indexing,
    slicing, ``narrow``, ``select``, ``t()`` / ``permute`` of a tensor whose elements are
    distinct nest their strides: sorted by stride, each dimension's stride exceeds the span of
    the smaller ones, and no two elements meet. Anything else (``expand``, a self-overlapping
    ``as_strided``) is checked element by element (from metadata alone under torch.compile,
    where it is refused)."""
    extent = 0
    for stride, size in sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= extent:
            break
        extent += (size - 1) * stride
    else:
        return False
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())) \
            or torch.compiler.is_compiling():
        return True
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return int(offsets.unique().numel()) != t.numel()


def span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [lo, hi) a tensor's elements occupy in its storage."""
    if t.numel() == 0:
        return (0, 0)
    lo = t.storage_offset()
    hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st > 0) + 1
    lo += sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    return lo * t.element_size(), hi * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors (their local shards, for DTensors) may have elements in common:
    one storage and address ranges that meet."""
    a, b = (t.to_local() if is_dtensor(t) else t for t in (a, b))
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device \
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (alo, ahi), (blo, bhi) = span(a), span(b)
    return alo < bhi and blo < ahi


def check_writable(weight: torch.Tensor, fn: str, name: str = "weight") -> None:
    """A tensor written in place must not have two elements in one memory location: the
    result would depend on the order of the writes and match no formula."""
    if weight.numel() > 1 and overlaps_itself(weight):
        raise ValueError(
            f"{fn}: {name} has elements that share memory (an expanded or self-overlapping "
            f"view: shape {tuple(weight.shape)}, strides {tuple(weight.stride())}); it cannot be "
            "written in place. Step the tensor it is a view of, or a .clone() of it")


def check_op_weights(fn: str, weights, dims, dim_counts, writes: bool) -> None:
    """The weights of a list op, as its kernels receive them (``dims`` flat, split by
    ``dim_counts``): strided float tensors on one device, valid dims, and for an op that writes,
    no element shared within a weight or between two weights."""
    if len(dim_counts) != len(weights):
        raise ValueError(f"{fn}: dim_counts needs one entry per weight")
    offset = 0
    for i, w in enumerate(weights):
        count = dim_counts[i]
        if count < 0 or offset + count > len(dims):
            raise ValueError(f"{fn}: dim_counts do not match dims")
        check_weight(w, fn, f"weights[{i}]")
        normalize_dim(list(dims[offset:offset + count]), w, f"{fn}: weights[{i}]")
        if writes:
            check_writable(w, fn, f"weights[{i}]")
        offset += count
        if w.device != weights[0].device:
            raise ValueError(f"{fn}: weights[{i}] is on {w.device} but weights[0] is on "
                             f"{weights[0].device}")
    if offset != len(dims):
        raise ValueError(f"{fn}: dim_counts do not match dims")
    if writes:  # by address: also tensors of two storages over one buffer (DLPack, frombuffer)
        ranges = [_address_range(w) for w in weights]
        for i in range(len(weights)):
            for j in range(i):
                if ranges[i][0] < ranges[j][1] and ranges[j][0] < ranges[i][1]:
                    raise ValueError(f"{fn}: weights[{j}] and weights[{i}] share memory")


def check_coupled_members(fn: str, members, set_sizes) -> None:
    """The members of a list of coupled sets (the next ``set_sizes[j]`` members are set j's),
    as their kernels receive them: strided float tensors on one device, each writable, no two
    members of one set sharing memory (two sets may hold one tensor: they run one after
    another)."""
    if any(s < 0 for s in set_sizes) or sum(set_sizes) != len(members):
        raise ValueError(f"{fn}: set_sizes do not match members")
    for i, w in enumerate(members):
        check_weight(w, fn, f"members[{i}]")
        check_writable(w, fn, f"members[{i}]")
        if w.device != members[0].device:
            raise ValueError(f"{fn}: members[{i}] is on {w.device} but members[0] is on "
                             f"{members[0].device}")
    first = 0
    for size in set_sizes:
        ranges = [_address_range(w) for w in members[first:first + size]]
        for i in range(size):
            for j in range(i):
                if ranges[i][0] < ranges[j][1] and ranges[j][0] < ranges[i][1]:
                    raise ValueError(f"{fn}: members[{first + j}] and members[{first + i}] "
                                     "share memory")
        first += size


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of a tensor's elements in memory (empty: an empty range)."""
    if t.numel() == 0:
        return (0, 0)
    lo, hi = span(t)
    base = t.untyped_storage().data_ptr()
    return base + lo, base + hi


def check_grad(weight: torch.Tensor, fn: str, name: str = "weight") -> None:
    """In-place on a tensor that requires grad, in grad mode: a leaf raises torch's own error for
    in-place ops; a non-leaf raises too, since the proximal steps have no derivative and would
    leave a stale grad_fn behind. (Version counters are bumped by the op, csrc/fastprox.cpp.)"""
    if weight.requires_grad and torch.is_grad_enabled():
        if weight.is_leaf:
            raise RuntimeError(
                f"{fn}: {name} is a leaf Variable that requires grad and is used in an in-place "
                "operation. Apply it under torch.no_grad() (as after optimizer.step())"
            )
        raise RuntimeError(
            f"{fn}: {name} requires grad and has a grad_fn, but the proximal step has no "
            "derivative; apply it under torch.no_grad() (as after optimizer.step())"
        )


def check_flag(value, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def is_threshold(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 0) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool))


def is_dim_spec(value) -> bool:
    return value is None or isinstance(value, (numbers.Integral, tuple, torch.Size))


def per_tensor(value, name: str, count: int, fn: str, is_item) -> list:
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
