"""Shared test helpers: the operator table, tolerances, and the kernel-vs-reference comparison."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import fastprox
from fastprox.operators import PRESETS

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances of a kernel result (in the weight's dtype) against the float64 reference of the same
# input, relative to the largest input magnitude of the tensor (atol) and to each value (rtol).
# 16-bit: the result is rounded once to the storage type (half an ulp: 2^-9 bf16, 2^-12 fp16)
# after float32 arithmetic, plus the float32 error of the per-group scale or threshold.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    fused: Callable
    ref: Callable
    lams: tuple  # a typical set of thresholds for N(0, 1) weights
    grouped: bool = True
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}[{extra}]" if extra else self.name


# One case per sample of every preset row of the operator table (fastprox/operators.py).
OPS = [Op(row.name, getattr(fastprox, row.name), row.oracle, lams, grouped=row.grouped,
          kwargs=dict(flags))
       for row in PRESETS for lams, flags in row.samples]
GROUPED_OPS = [op for op in OPS if op.grouped]


def run(op: Op, weight: torch.Tensor, lams=None, dim=None, fused=True) -> torch.Tensor:
    fn = op.fused if fused else op.ref
    lams = op.lams if lams is None else lams
    if op.grouped:
        return fn(weight, *lams, dim, **op.kwargs)
    return fn(weight, *lams)


def expected(op: Op, weight: torch.Tensor, lams=None, dim=None) -> torch.Tensor:
    """The float64 reference result for weight (not modified)."""
    return run(op, weight.detach().to(torch.float64).clone(), lams, dim, fused=False)


def assert_matches_reference(op: Op, weight: torch.Tensor, lams=None, dim=None) -> torch.Tensor:
    """Runs the fused op in place on weight and compares it with the float64 reference."""
    want = expected(op, weight, lams, dim)
    ptr = weight.data_ptr()
    got = run(op, weight, lams, dim)
    assert got is weight and weight.data_ptr() == ptr, "must work in place and return weight"
    scale = want.abs().nan_to_num(posinf=0).max().item() if want.numel() else 1.0
    tol = TOLERANCES[weight.dtype]
    torch.testing.assert_close(
        weight.to(torch.float64), want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0),
        equal_nan=True, msg=lambda m: f"{op} dim={dim} {weight.dtype} {tuple(weight.shape)}: {m}",
    )
    return weight


def metric_group_kkt(z, d, x, dims, lam_l1: float, t: float, atol: float = 1e-9) -> int:
    """Checks that x (float64) is the metric sparse-group step of z in diag(d) (docs/SPEC.md),
    without a reference: 0 in D(x - z) + lam_l1 d|x| + t d||x_g||. Kept groups satisfy the
    gradient condition elementwise (elements zeroed in them have |d z| <= lam_l1), removed ones
    ||soft(D z, lam_l1)|| <= t. Returns the number of kept groups."""
    from fastprox import reference

    zr, dr, xr = (reference._as_groups(a.to("cpu", torch.float64), dims) for a in (z, d, x))
    theta = torch.linalg.vector_norm(xr, dim=1, keepdim=True)
    kept = (theta > 0).squeeze(1)
    soft = reference.shrink_magnitude(dr * zr, lam_l1)
    assert bool((torch.linalg.vector_norm(soft[~kept], dim=1) <= t * (1 + 1e-9)).all())
    on = xr != 0
    grad = dr * (xr - zr) + lam_l1 * xr.sign() + t * xr / torch.where(theta > 0, theta, 1.0)
    torch.testing.assert_close(grad[on], torch.zeros_like(grad)[on], atol=atol, rtol=0)
    assert bool(((dr * zr).abs()[kept[:, None] & ~on] <= lam_l1 * (1 + 1e-12) + 1e-15).all())
    return int(kept.sum())


def metric_exclusive_kkt(z, d, x, dims, lam: float) -> int:
    """Checks that x (float64) is the metric exclusive step of z: d_i (x_i - z_i) + lam S
    sign(x_i) = 0 where x_i != 0 and |d_i z_i| <= lam S where x_i = 0, S = ||x_g||_1. Returns
    the number of nonzero results."""
    from fastprox import reference

    zr, dr, xr = (reference._as_groups(a.to("cpu", torch.float64), dims) for a in (z, d, x))
    s = xr.abs().sum(dim=1, keepdim=True)
    on = xr != 0
    grad = dr * (xr - zr) + lam * s * xr.sign()
    torch.testing.assert_close(grad[on], torch.zeros_like(grad)[on], atol=1e-9, rtol=0)
    bar = (lam * s).expand_as(zr)
    assert bool(((dr * zr).abs()[~on] <= bar[~on] * (1 + 1e-9) + 1e-12).all())
    return int(on.sum())


def random_moment(shape, dtype=torch.float32) -> torch.Tensor:
    """A second moment as Adam leaves it (>= 0, spread over orders of magnitude, some 0), its
    scale falling along every dimension (so that groups of any layout differ: some removed)."""
    import math

    v = torch.exp(torch.empty(shape).uniform_(math.log(1e-4), math.log(1e-2)))
    for k, size in enumerate(shape):
        fall = torch.logspace(0, -6, size).reshape([size if j == k else 1
                                                    for j in range(len(shape))])
        v = v * fall
    v.view(-1)[::5] = 0
    return v.to(dtype)


def random_weight(shape, dtype, generator=None) -> torch.Tensor:
    """N(0, 1) values, with a few exact zeros and whole zero slices to exercise zero groups."""
    w = torch.randn(shape, dtype=torch.float64, generator=generator)
    if w.numel() > 4:
        w.view(-1)[:: max(1, w.numel() // 5)] = 0
    if w.dim() >= 2 and w.shape[0] > 2 and w.shape[1] > 0:
        w[1] = 0  # a whole zero row
        w[:, 0] = 0  # a whole zero column
    return w.to(dtype)


class TinyMLP(torch.nn.Module):
    """A block MLP (up, ReLU, down: 6 -> 8 -> 6) the neurons preset finds."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def readme_snippet(heading: str) -> str:
    """The first Python block of README.md after ``heading``."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)
