"""fastprox's GPU kernels (Triton), installed as ``fastprox.kernels``: the CUDA implementation of
the ops of the ``fastprox`` library (schemas: csrc/fastprox.cpp): ``group_norms``, the fused
in-place step ``foreach_prox_``, of which every in-place operator is a preset
(fastprox/operators.py), and the phases of steps whose groups span several tensors
(``foreach_group_sums``, ``foreach_group_sums_above``, ``foreach_group_rewrite_``), and the step
in an Adam step's metric ``foreach_metric_prox_``.

One file per op holds its CUDA entry (checks, then the launch), as csrc/cpu/ does for the CPU;
the kernels they share are in group_engine.py, the host side (layouts, thresholds, buckets,
tables, tuning) in launch.py and layout.py.

``register()`` makes them the ``CUDA`` kernels of the custom ops (fastprox/_registry.py calls it
when CUDA and Triton are there). The registration is for CUDA only: CPU tensors keep the C++
kernels, and opcheck / torch.compile on CPU-only machines never touch Triton. The entries can
be called directly on CPU tensors under ``TRITON_INTERPRET=1`` (set before ``import triton``),
which is how the kernels are tested without a GPU (tests_kernels/).
"""

from __future__ import annotations

import torch

from .foreach_prox import foreach_prox_
from .group_norms import group_norms
from .group_phases import foreach_group_rewrite_, foreach_group_sums, foreach_group_sums_above
from .metric_prox import foreach_metric_prox_

ENTRIES = {"group_norms": group_norms, "foreach_prox_": foreach_prox_,
           "foreach_group_sums": foreach_group_sums,
           "foreach_group_sums_above": foreach_group_sums_above,
           "foreach_group_rewrite_": foreach_group_rewrite_,
           "foreach_metric_prox_": foreach_metric_prox_}

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
