"""The per-group rules of the phased step (fastprox/_phases.py: coupled groups, groups across
shards), from a group's combined sums to its scale and exclusive threshold. Formulas and edge
cases: docs/SPEC.md; the C++ and Triton kernels apply the same rules inside their kernels
(csrc/cpu/group_steps.h, kernels/prox_kernels.py), and fastprox/reference.py states them again,
in a form of its own, as the tests' oracle.
"""

from __future__ import annotations

import torch

# Newton steps of one scalar equation at most, in every engine: the phased step's exact exclusive
# threshold here, csrc/cpu/group_steps.h's kMaxNewton (the Euclidean and metric CPU kernels),
# kernels/metric_kernels.py's MAX_NEWTON (the Triton kernels). Typical data needs 3-15.
MAX_NEWTON_STEPS = 100


def group_scale(norms: torch.Tensor, t) -> torch.Tensor:
    """s = 0 if ||W_g|| <= t else 1 - t/||W_g||: a NaN norm gives a NaN scale, an infinite one
    1 (also when t overflows the norms' dtype), a zero group 0 (never a division by zero)."""
    scale = torch.where(norms <= t, torch.zeros_like(norms), 1 - t / norms)
    return torch.where(torch.isinf(norms), torch.ones_like(norms), scale)


def cges_bound(l1: torch.Tensor, lam: float) -> torch.Tensor:
    """CGES's exclusive threshold lam * ||W_g||_1 (0 for a zero group, even when lam is inf)."""
    return torch.where(l1 > 0, lam * l1, torch.zeros_like(l1))


def newton_tau(total: torch.Tensor, count: torch.Tensor, lam: float) -> torch.Tensor:
    """lam S / (1 + lam k) for the sum S of the k magnitudes above tau (0 when k = 0), written
    S / (1/lam + k) so that a lam that overflows still gives S / k."""
    return torch.where(count > 0, total / (1 / lam + count), torch.zeros_like(total))


def exclusive_tau(tau: torch.Tensor, l1: torch.Tensor, scale) -> torch.Tensor:
    """The exclusive threshold of each group after the edge rules: a NaN group (NaN l1 norm)
    gets NaN; an infinite group, or one the group step zeroed (scale 0), gets 0 (it keeps its
    values / stays zero)."""
    keep = torch.isinf(l1) | (scale == 0)
    tau = torch.where(keep, torch.zeros_like(tau), tau)
    return torch.where(torch.isnan(l1), l1, tau)
