"""Whole-model proximal step on the CPU: foreach_prox_ (one call) vs a Python loop of
single-tensor calls vs the eager reference loop vs the one-pass floor (torch._foreach_mul_).

    make bench      # or: pytest bench/test_bench_model_cpu.py --benchmark-only

Parameter lists shaped like ResNet-50 (54 tensors, 25.5M weights; conv input-channel groups,
fc columns) and GPT-2 small (48 Linear weights, 85M; columns), float32 and bfloat16, group
lasso (what Regularizer(model, "group_lasso") applies after every step). The summary
(bench/conftest.py) gives medians, GB/s over all tensors and the ratios.
"""

from __future__ import annotations

import pytest
import torch

import fastprox
from fastprox import reference
from model_shapes import gpt2_small_weights, resnet50_weights

MODELS = {"resnet50": resnet50_weights, "gpt2-small": gpt2_small_weights}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["foreach", "loop", "reference", "floor"]
LAM = 1e-3

_cache: dict = {}


def _weights(model: str, dtype: str):
    key = (model, dtype)
    if key not in _cache:
        _cache.clear()
        g = torch.Generator().manual_seed(0)
        layout = MODELS[model]()
        _cache[key] = ([torch.randn(s, generator=g).mul_(0.02).to(DTYPES[dtype]) for s, _ in layout],
                       [d for _, d in layout])
    return _cache[key]


def _step(impl: str, dims):
    if impl == "foreach":
        return lambda ws: fastprox.foreach_prox_(ws, lam_group=LAM, dim=dims)
    if impl == "loop":
        return lambda ws: [fastprox.group_shrink_(w, LAM, d) for w, d in zip(ws, dims)]
    if impl == "reference":
        return lambda ws: [reference.group_shrink_(w, LAM, d) for w, d in zip(ws, dims)]
    return lambda ws: torch._foreach_mul_(ws, 0.999)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_model_step(benchmark, model, dtype, impl):
    source, dims = _weights(model, dtype)
    work = [w.clone() for w in source]
    fn = _step(impl, dims)

    def restore():
        torch._foreach_copy_(work, source)

    with torch.no_grad():
        fn(work)
        restore()
        benchmark.group = f"model {model} {dtype}"
        benchmark.extra_info.update(
            model=model, dtype=dtype, impl=impl, tensors=len(work),
            bytes=2 * sum(w.numel() * w.element_size() for w in work))
        slow = impl == "reference"
        benchmark.pedantic(fn, args=(work,), setup=restore, rounds=3 if slow else 10,
                           warmup_rounds=0 if slow else 1)
