"""fastprox's GPU kernels (Triton), installed as ``fastprox.kernels``: the CUDA implementation of
every operator of the ``fastprox`` op library (schemas: csrc/fastprox.cpp).

One file per operator holds its CUDA entry (checks, then the launch), as csrc/cpu/ does for the
CPU; the kernels they share are in group_engine.py, the host side (layouts, thresholds,
buckets, tables, tuning) in launch.py and layout.py.

``register()`` makes them the ``CUDA`` kernels of the custom ops (fastprox/_registry.py calls it
when CUDA and Triton are there). The registration is for CUDA only: CPU tensors keep the C++
kernels, and opcheck / torch.compile on CPU-only machines never touch Triton. The entries can
be called directly on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``import triton``),
which is how the kernels are tested without a GPU (tests_interpret/).
"""

from __future__ import annotations

import torch

from .cges_shrink import cges_shrink_
from .exclusive_shrink import exclusive_shrink_
from .foreach_prox import foreach_prox_
from .group_norms import group_norms
from .group_shrink import group_shrink_
from .soft_threshold import soft_threshold_
from .sparse_group_shrink import sparse_group_shrink_

ENTRIES = {
    "group_norms": group_norms,
    "group_shrink_": group_shrink_,
    "soft_threshold_": soft_threshold_,
    "sparse_group_shrink_": sparse_group_shrink_,
    "exclusive_shrink_": exclusive_shrink_,
    "cges_shrink_": cges_shrink_,
    "foreach_prox_": foreach_prox_,
}

_registered = False


def register() -> None:
    """Registers every entry as the CUDA kernel of its op (once)."""
    global _registered
    if _registered:
        return
    for name, fn in ENTRIES.items():
        torch.library.register_kernel(f"fastprox::{name}", "cuda", fn)
    _registered = True


__all__ = ["ENTRIES", "register", *ENTRIES]
