"""The Regularizer's proximal step after AdamW steps, on every backend through the dispatcher:
plain targets and coupled sets, in the AdamW metric (the plan of fastprox/metric_plan.py) and
in the Euclidean metric, against the same step served by the float64 reference. On a CUDA
machine this is the training layer's path on CUDA tensors (the plan reading the optimizer's
numbers from the device), after a default and a capturable AdamW."""

from __future__ import annotations

import pytest
import torch

import fastprox
from helpers import TOLERANCES, TinyMLP
from kernel_calls import DEVICE, served_by

LAMS = {"group_lasso": 0.05, "sparse_group_lasso": 0.05, "exclusive": 0.5, "neurons": 0.05}
EUCLIDEAN = 400  # its thresholds are lr * lam: strengths that remove some groups, not all
OPTIMIZERS = ["adamw"] + (["adamw capturable"] if DEVICE == "cuda" else [])


def _trained(preset, optimizer, seed, scale=1.0):
    """Two MLP blocks on the device under ``preset`` after three AdamW steps: built twice from
    one seed, the same weights and optimizer state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(TinyMLP(), TinyMLP()).to(DEVICE)
    reg = fastprox.Regularizer(model, preset, lam=LAMS[preset] * scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2,
                            capturable=optimizer == "adamw capturable")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 6, device=DEVICE)).square().mean().backward()
        opt.step()
    return model, reg, opt


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("prox", ["metric", "euclidean"])
@pytest.mark.parametrize("preset", list(LAMS))
def test_the_regularizer_step_is_the_reference_backends(backend, preset, prox, optimizer):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    scale = EUCLIDEAN if prox == "euclidean" else 1.0
    model, reg, opt = _trained(preset, optimizer, seed, scale)
    want, want_reg, want_opt = _trained(preset, optimizer, seed, scale)
    for p, q in zip(model.parameters(), want.parameters()):
        assert torch.equal(p, q)
    for _ in range(2):  # the second step on the plan the first one built
        reg.prox_step(opt, prox=prox)
        with served_by("reference"):
            want_reg.prox_step(want_opt, prox=prox)
    zeros = total = 0
    for (name, got), w in zip(model.named_parameters(), want.parameters()):
        torch.testing.assert_close(got, w, **TOLERANCES[torch.float32], msg=name)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert 0 < zeros < total  # the step removes something, not everything
