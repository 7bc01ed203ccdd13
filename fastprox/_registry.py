"""Loads the operator library and registers what PyTorch needs beyond its C++ kernels.

Schemas: csrc/fastprox.cpp (defined once: group_norms, the fused step foreach_prox_, the step in
an Adam metric foreach_metric_prox_ and its coupled form coupled_metric_prox_, and the phases
foreach_group_sums / foreach_group_sums_above / foreach_group_rewrite_ of steps whose groups
span several tensors).
The dispatcher alone picks the kernel, by device:

    CPU                      the C++ kernels (csrc/cpu/)
    CUDA, Triton installed   the Triton kernels (kernels/, installed as fastprox.kernels),
                             behind the checks of fastprox/_triton.py; registered here
    any other device         the default backend: the C++ kernels on a host copy
                             (fastprox/_host.py)

Here too: the fake (meta) implementation of each op, used by torch.compile and opcheck, the
autograd formula of group_norms (the in-place steps have no derivative: _checks.check_grad), and
``serve``, which has CPU tensors served by another backend (the Triton kernels under Triton's
interpreter, or the float64 reference) through the same dispatcher: how one test suite runs
every backend.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from . import _host
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


_triton_registered = False


def register_triton() -> bool:
    """The Triton kernels (fastprox/_triton.py) become the CUDA kernels of the ops, once; False
    where Triton is not installed (CUDA tensors then get the default backend)."""
    global _triton_registered
    if not _triton_registered:
        from . import _triton
        if _triton.kernels is None:
            return False
        for name, fn in _triton.ENTRIES.items():
            torch.library.register_kernel(f"fastprox::{name}", "cuda", fn)
        _triton_registered = True
    return True


# CUDA only (CUDA wheels of torch ship Triton): CPU tensors, opcheck and torch.compile on
# CPU-only machines never import Triton.
if torch.cuda.is_available():
    register_triton()

BACKENDS = ("cpp", "triton", "host", "reference")


def _entries(backend: str) -> dict:
    """Op name -> the kernel of ``backend`` (none for "cpp": the C++ kernels are the CPU's)."""
    if backend == "triton":
        from . import _triton
        if _triton.kernels is None:
            raise RuntimeError("serve: the triton backend needs Triton installed")
        return _triton.ENTRIES
    if backend == "host":
        return _host.ENTRIES
    from . import reference  # the tests' oracle, as a backend

    return {"group_norms": reference.group_norms_op, "foreach_prox_": reference.fused_step,
            "foreach_metric_prox_": reference.foreach_metric_prox_op,
            "foreach_group_sums": reference.foreach_group_sums_op,
            "foreach_group_sums_above": reference.foreach_group_sums_above_op,
            "foreach_group_rewrite_": reference.foreach_group_rewrite_op,
            "coupled_metric_prox_": reference.coupled_metric_prox_op}


@contextlib.contextmanager
def serve(backend: str, device: str = "cpu"):
    """Within the block, the ops on tensors of ``device`` ("cpu" or "cuda") are served by
    ``backend``, through the dispatcher, so that every caller of ``torch.ops.fastprox`` (the
    public API, eager or compiled) reaches it:

        "cpp"        the C++ kernels (CPU tensors: what they always get)
        "triton"     the Triton kernels behind their checks (CUDA tensors: what they get where
                     Triton is installed; CPU tensors: under TRITON_INTERPRET=1, set before
                     Triton is imported)
        "host"       the default backend, the C++ kernels on a host copy (CUDA tensors)
        "reference"  the float64 oracle of the tests

    The kernels registered before come back at the end of the block."""
    if backend not in BACKENDS or device not in ("cpu", "cuda"):
        raise ValueError(f"serve: backend must be one of {BACKENDS} and device 'cpu' or "
                         f"'cuda', got {backend!r}, {device!r}")
    if (backend, device) in (("cpp", "cuda"), ("host", "cpu")):
        raise ValueError(f"serve: the {backend} backend does not serve {device} tensors")
    if backend == "cpp" or (backend == "triton" and device == "cuda" and register_triton()):
        yield
        return
    entries = _entries(backend)
    with torch.library._scoped_library("fastprox", "IMPL") as lib:
        with warnings.catch_warnings():  # the kernels registered before are overridden
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered")
            for name, fn in entries.items():
                lib.impl(name, fn, device.upper())
        yield


def kept_shape(weight: torch.Tensor, dim: list[int]) -> list[int]:
    """Shape of the per-group values: the weight's sizes along the dimensions not in ``dim``."""
    reduced = {d % weight.dim() for d in dim}
    return [s for d, s in enumerate(weight.shape) if d not in reduced]


def _group_norms_fake(weight, dim):
    return weight.new_empty(kept_shape(weight, dim))


def _no_output(*args, **kwargs):
    return None


# Per kind of table row: its fake. Presets have no op of their own.
_FAKES = {"norms": _group_norms_fake, "fused": _no_output, "metric": _no_output}
for _row in OPERATORS:
    if _row.kind in _FAKES:
        torch.library.register_fake(f"fastprox::{_row.name}")(_FAKES[_row.kind])
# The default backend, for every device type; a device's own kernel (CPU, CUDA with Triton)
# takes precedence.
for _name, _default in _host.ENTRIES.items():
    torch.library.register_kernel(f"fastprox::{_name}", None, _default)


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
torch.library.register_fake("fastprox::foreach_group_sums_above")(
    lambda weights, dims, dim_counts, lam_l1, scales, taus:
    _foreach_group_sums_fake(weights, dims, dim_counts, lam_l1, 2))
torch.library.register_fake("fastprox::foreach_group_rewrite_")(_no_output)
# The step of coupled groups in an optimizer's metric (fastprox/metric.py): an op of its own too.
torch.library.register_fake("fastprox::coupled_metric_prox_")(_no_output)


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
