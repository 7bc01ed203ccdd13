"""foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact, caller, lam_names) on
CUDA, the fused in-place step: per weight i with (l1, lg, le) = lams[i]:
    W <- soft threshold by l1, group shrink by lg * c, exclusive shrink by le  (0: skipped)
in a few launches for a whole model: weights are bucketed by dtype and tile shape, and each
bucket is one launch addressing its weights through offset tables (kernels/launch.py). A single
weight whose only step is the soft threshold (soft_threshold_) is thresholded elementwise over
its memory span (soft_threshold_kernel). Inside a CUDA graph capture it uploads nothing and never
synchronises, once the same step ran eagerly. ``caller`` and ``lam_names`` name the function and
its thresholds in errors; a column named '' is never set by the caller (its sub-step is not
compiled in, even when the thresholds are held on the GPU). Contract: docs/SPEC.md; reference:
fastprox/reference.py; CPU: csrc/cpu/foreach_prox.cpp.
"""

from __future__ import annotations

import torch

from . import launch
from .tables import check_device_lams, split_dims

# the fused step's thresholds, in the order of a row of ``lams`` (fastprox/operators.py COLUMNS)
COLUMNS = ("lam_l1", "lam_group", "lam_exclusive")


def foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact,
                  caller="foreach_prox_", lam_names=None):
    n = len(weights)
    lam_names = lam_names or COLUMNS
    if len(dim_counts) != n or len(size_weighted) != n or len(exact) != n:
        raise ValueError(f"{caller}: dim_counts, size_weighted and exact need one entry per "
                         "weight")
    if len(lam_names) != 3:
        raise ValueError(f"{caller}: lam_names must name the three thresholds")
    if not (isinstance(lams, torch.Tensor) and lams.numel() == 3 * n
            and lams.dtype == torch.float64):
        raise ValueError(f"{caller}: lams must be a float64 tensor of 3 * len(weights) values")
    lams = lams.reshape(n, 3)
    tensor_dims = split_dims(weights, dims, dim_counts)
    entries = [(w, d, None, size_weighted[i], exact[i])
               for i, (w, d) in enumerate(zip(weights, tensor_dims))]

    def names(i, k):
        return f"{caller}: {lam_names[k]}" + (f"[{i}]" if n > 1 else "")

    used = tuple(bool(name) for name in lam_names)
    if lams.device.type == "cpu":  # read on the host, checked there
        rows = lams.tolist()
        launch.prox_([(w, d, tuple(rows[i]), sw, ex) for i, (w, d, _, sw, ex)
                      in enumerate(entries)], names, used=used)
    elif n:  # thresholds held on the GPU (e.g. a learning rate in a CUDA tensor)
        if lams.device != weights[0].device:
            raise ValueError(f"{caller}: lams is on {lams.device} but the weights are on "
                             f"{weights[0].device}")
        check_device_lams(lams, names)
        launch.prox_(entries, names, table=lams.contiguous(), used=used)
