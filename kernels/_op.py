"""What every in-place operator's CUDA entry does first: the checks of the CPU entry
(csrc/cpu/prox_entry.h), in its order, before any memory is touched."""

from __future__ import annotations

from .. import _checks
from . import launch


def checked(weight, dim, fn: str) -> list[int]:
    _checks.check_weight(weight, fn)
    dims = _checks.normalize_dim(list(dim), weight, fn)
    launch.check_writable(weight)
    return dims


def step(weight, dims, l1=0.0, lam_group=0.0, lam_exclusive=0.0, *, size_weighted=True,
         exact=True, names=("lam_l1", "lam_group", "lam_exclusive")) -> None:
    """One weight's proximal step; names[k] names threshold k in errors."""
    launch.prox_([(weight, dims, (l1, lam_group, lam_exclusive), size_weighted, exact)],
                 lambda i, k: names[k])
