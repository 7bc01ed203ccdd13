"""fastprox's GPU kernels (Triton), installed as ``fastprox.kernels``: the CUDA implementation of
the ops of the ``fastprox`` library (schemas: csrc/fastprox.cpp): ``group_norms``, the fused
in-place step ``foreach_prox_``, of which every in-place operator is a preset, the phases of
steps whose groups span several tensors (``foreach_group_sums``, ``foreach_group_sums_above``,
``foreach_group_rewrite_``), the step in an Adam step's metric ``foreach_metric_prox_`` and its
coupled form ``coupled_metric_prox_``.

A leaf: nothing here imports fastprox. One file per op holds its entry (its tables checked, then
the launch; the phase ops and the metric steps plan their launches there too), as csrc/cpu/ does
for the CPU; the device kernels, one file per family, are prox_kernels.py (the fused step, its
split path, the soft threshold), phase_kernels.py, metric_kernels.py and coupled_kernels.py (the
coupled metric step, on the metric kernel's per-group rules), on the helpers of tile_ops.py; the host side shared by all of them is layout.py (layouts), tiles.py (tiles,
register budgets, warp counts, tuning), tables.py (thresholds, per-tensor and block tables,
uploads) and launch.py (buckets, plans and runs of the fused step, the runs of every bucket).
The entries take the weights checked: fastprox/_triton.py checks them and is what
fastprox/_registry.py registers as the ops' CUDA kernels (and, for the tests, as their CPU
kernels under ``TRITON_INTERPRET=1``, set before ``import triton``: fastprox._registry.serve).
"""

from __future__ import annotations

import sys

if __name__ != "fastprox.kernels":
    # Found as a top-level ``kernels`` (Python started in the source tree, whose root is on
    # sys.path): this folder is not that package. Another distribution of that name (Hugging
    # Face's ``kernels``, which transformers imports) is loaded in its place, from the rest of
    # sys.path; without one, the import fails as it would outside the tree.
    from ._outside import load_elsewhere

    sys.modules[__name__] = load_elsewhere(__name__, __file__)
else:
    from .coupled_metric import coupled_metric_prox_
    from .foreach_prox import foreach_prox_
    from .group_norms import group_norms
    from .group_phases import foreach_group_rewrite_, foreach_group_sums, \
        foreach_group_sums_above
    from .metric_prox import foreach_metric_prox_

    ENTRIES = {"group_norms": group_norms, "foreach_prox_": foreach_prox_,
               "foreach_group_sums": foreach_group_sums,
               "foreach_group_sums_above": foreach_group_sums_above,
               "foreach_group_rewrite_": foreach_group_rewrite_,
               "foreach_metric_prox_": foreach_metric_prox_,
               "coupled_metric_prox_": coupled_metric_prox_}

    __all__ = ["ENTRIES", *ENTRIES]
