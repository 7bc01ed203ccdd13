"""Loads the operator library and registers what PyTorch needs beyond its C++ kernels.

Schemas: csrc/fastprox.cpp (defined once: group_norms, the fused step foreach_prox_, and the
phases foreach_group_sums / foreach_group_sums_above / foreach_group_rewrite_ of steps whose
groups span several tensors). CPU kernels: csrc/cpu/. CUDA kernels: kernels/ (Triton, installed as
fastprox.kernels), registered here when CUDA and Triton are there. Every other device (CUDA
without Triton, MPS, XPU, ...) gets the reference (fastprox/reference.py) as its kernel, as the
default backend of the dispatcher: the dispatcher alone picks the kernel. Here too: the fake
(meta) implementation of each op, used by torch.compile and opcheck, generated from the
operator table (fastprox/operators.py), and the autograd formula of group_norms. The fused step
has no derivative (see _checks.check_grad).
"""

from __future__ import annotations

import torch

from . import reference
from .operators import OPERATORS

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # a silent fallback to the reference would hide a broken install
    raise ImportError(
        "fastprox: the C++ extension fastprox._C failed to load "
        f"({exc}). Rebuild it against the installed torch with "
        "`pip install --no-build-isolation -e .` (or `make build`)."
    ) from exc


def _check_cpu_capability() -> None:
    built = _C.cpu_capability
    ranks = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    here = torch.backends.cpu.get_cpu_capability()
    if ranks.get(built, 0) > ranks.get(here, 0):
        raise ImportError(
            f"fastprox: the C++ extension was built for {built} but this CPU supports {here}. "
            "Rebuild here, or build with FASTPROX_CPU_CAPABILITY=DEFAULT for a portable build."
        )


_check_cpu_capability()

ops = torch.ops.fastprox


def _register_gpu_kernels() -> None:
    """The Triton kernels (fastprox.kernels) become the CUDA kernels of the ops when this torch
    has CUDA and Triton is installed (CUDA wheels of torch ship it). CUDA only: CPU tensors,
    opcheck and torch.compile on CPU never import Triton."""
    if not torch.cuda.is_available():
        return
    try:
        from . import kernels
    except ImportError:  # no Triton: CUDA weights get the default backend (the reference)
        return
    kernels.register()


_register_gpu_kernels()


def kept_shape(weight: torch.Tensor, dim: list[int]) -> list[int]:
    """Shape of the per-group values: the weight's sizes along the dimensions not in ``dim``."""
    reduced = {d % weight.dim() for d in dim}
    return [s for d, s in enumerate(weight.shape) if d not in reduced]


def _group_norms_fake(weight, dim):
    return weight.new_empty(kept_shape(weight, dim))


def _no_output(*args, **kwargs):
    return None


# Per kind of table row: (fake, default kernel). Presets have no op of their own.
_BY_KIND = {"norms": (_group_norms_fake, reference.group_norms_op),
            "fused": (_no_output, reference.fused_step),
            "metric": (_no_output, reference.foreach_metric_prox_op)}
for _row in OPERATORS:
    if _row.kind in _BY_KIND:
        _fake, _default = _BY_KIND[_row.kind]
        torch.library.register_fake(f"fastprox::{_row.name}")(_fake)
        # every device type; a device's own kernel (CPU, CUDA with Triton) takes precedence
        torch.library.register_kernel(f"fastprox::{_row.name}", None, _default)


def _foreach_group_sums_fake(weights, dims, dim_counts, lam_l1, what):
    count = (1 if what & 1 else 0) + (2 if what & 2 else 0)
    out, offset = [], 0
    for w, n in zip(weights, dim_counts):
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        out.append(w.new_empty([count, *kept_shape(w, list(dims[offset:offset + n]))],
                               dtype=acc))
        offset += n
    return out


# The phases of steps whose groups span several tensors (fastprox/_phases.py): ops of their own,
# not rows of the table (the coupled row runs on them).
torch.library.register_fake("fastprox::foreach_group_sums")(_foreach_group_sums_fake)
torch.library.register_kernel("fastprox::foreach_group_sums", None,
                              reference.foreach_group_sums_op)
torch.library.register_fake("fastprox::foreach_group_sums_above")(
    lambda weights, dims, dim_counts, lam_l1, scales, taus:
    _foreach_group_sums_fake(weights, dims, dim_counts, lam_l1, 2))
torch.library.register_kernel("fastprox::foreach_group_sums_above", None,
                              reference.foreach_group_sums_above_op)
torch.library.register_fake("fastprox::foreach_group_rewrite_")(_no_output)
torch.library.register_kernel("fastprox::foreach_group_rewrite_", None,
                              reference.foreach_group_rewrite_op)


def _group_norms_setup_context(ctx, inputs, output):
    weight, dim = inputs
    ctx.dim = dim
    ctx.save_for_backward(weight, output)


def _group_norms_backward(ctx, grad_norms):
    # d||w||/dw = w / ||w||; at a zero group the subgradient 0 is taken (finite, never NaN).
    weight, norms = ctx.saved_tensors
    reduced = sorted(d % weight.dim() for d in ctx.dim)
    for d in reduced:  # broadcast per-group values back over the reduced dimensions
        norms = norms.unsqueeze(d)
        grad_norms = grad_norms.unsqueeze(d)
    safe = torch.where(norms == 0, torch.ones_like(norms), norms)
    grad = torch.where(norms == 0, torch.zeros_like(weight), weight * (grad_norms / safe))
    return grad, None


torch.library.register_autograd(
    "fastprox::group_norms", _group_norms_backward, setup_context=_group_norms_setup_context
)
