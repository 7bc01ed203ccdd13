"""CPU benchmarks (pytest-benchmark): every case of the harness (bench/harness.py: the operator
table's bench samples) as fastprox, the user's eager PyTorch, torch.compile of it, and the
one-pass floor (an in-place ``w.mul_(c)`` on the same tensor: one read and one write); then
whole-model steps.

    make bench            # or: pytest bench --benchmark-only

Weights: 8192x4096 with row groups (dim=1) and column groups (dim=0), and 512x512 (both), in
float32 and bfloat16; parameter lists shaped like ResNet-50 (54 tensors, 25.5M weights) and
GPT-2 small (48 Linear weights, 85M). The weight is restored (untimed) before every round, so
every round sees the same values. The summary (harness.report, printed at the end by
bench/conftest.py) is also written to bench/last-run-cpu.md.
"""

from __future__ import annotations

import pytest
import torch

import fastprox
import harness
from model_shapes import gpt2_small_weights, resnet50_weights

MODELS = {"resnet50": resnet50_weights, "gpt2-small": gpt2_small_weights}
MODEL_IMPLS = ["foreach", "loop", "eager", "floor"]
MODEL_LAM = 1e-3

_weights: dict = {}
_compiled: dict = {}


def _cached(key, make):
    if key not in _weights:
        _weights.clear()  # keep one large weight (or list) alive at a time
        _weights[key] = make(torch.Generator().manual_seed(0))
    return _weights[key]


def _fn(case: harness.Case, impl: str, dim):
    if impl == "fastprox":
        fn = case.fastprox()
    elif impl == "eager":
        fn = case.eager()
    elif impl == "compiled":
        key = (case.label, dim)
        if key not in _compiled:
            _compiled[key] = torch.compile(case.eager(), dynamic=False)
        fn = _compiled[key]
    else:
        return lambda w: w.mul_(0.999)
    return lambda w: fn(w, dim)


def _time(benchmark, fn, work, restore, slow: bool):
    with torch.no_grad():
        fn(work)  # warm-up (and compilation) outside the timing
        restore()
        benchmark.pedantic(fn, args=(work,), setup=restore, rounds=5 if slow else 15,
                           warmup_rounds=0 if slow else 2)


@pytest.mark.parametrize("impl", harness.IMPLS)
@pytest.mark.parametrize("dtype_name", list(harness.DTYPES))
@pytest.mark.parametrize("shape_name", list(harness.SHAPES_CPU))
@pytest.mark.parametrize("label", list(harness.BY_LABEL))
def test_cpu(benchmark, label, shape_name, dtype_name, impl):
    case = harness.BY_LABEL[label]
    shape, dim = harness.SHAPES_CPU[shape_name]
    if not case.row.grouped and dim == 0:
        pytest.skip("no groups: the row case covers it")
    source = _cached((shape_name, dtype_name), lambda g: torch.randn(
        shape, generator=g).to(harness.DTYPES[dtype_name]))
    work = source.clone()
    benchmark.group = f"{label} {shape_name} {dtype_name}"
    benchmark.extra_info.update(
        op=label, weight=shape_name, dtype=dtype_name, impl=impl,
        bytes=case.moves(source.numel(), source.element_size()) if impl != "floor"
        else 2 * source.numel() * source.element_size())
    slow = impl in ("eager", "compiled") and source.numel() >= 1 << 22 and \
        case.row.newton(case.flags)
    _time(benchmark, _fn(case, impl, dim), work, lambda: (work.copy_(source), None)[1], slow)


@pytest.mark.parametrize("impl", MODEL_IMPLS)
@pytest.mark.parametrize("dtype_name", list(harness.DTYPES))
@pytest.mark.parametrize("model", list(MODELS))
def test_model_step(benchmark, model, dtype_name, impl):
    layout = MODELS[model]()
    dims = [d for _, d in layout]
    source = _cached((model, dtype_name), lambda g: [
        torch.randn(s, generator=g).mul_(0.02).to(harness.DTYPES[dtype_name]) for s, _ in layout])
    work = [w.clone() for w in source]
    steps = harness.model_steps(dims, MODEL_LAM)
    fn = steps[impl] if impl != "floor" else (lambda ws: torch._foreach_mul_(ws, 0.999))
    benchmark.group = f"model {model} {dtype_name}"
    benchmark.extra_info.update(
        model=model, dtype=dtype_name, impl=impl, tensors=len(work),
        bytes=2 * sum(w.numel() * w.element_size() for w in work))
    _time(benchmark, fn, work, lambda: (torch._foreach_copy_(work, source), None)[1],
          impl == "eager")


COUPLED_MODELS = ["resnet50", "gpt2-small"]
COUPLED_IMPLS = ["coupled", "per_tensor", "floor"]


@pytest.mark.parametrize("impl", COUPLED_IMPLS)
@pytest.mark.parametrize("model", COUPLED_MODELS)
def test_coupled_step(benchmark, model, impl):
    """Group lasso on a real model's coupled groups (ResNet-50 channels; GPT-2 small heads and
    neurons) against group lasso per tensor on the same weights and the floor (one mul_ of
    every tensor the sets touch), float32."""
    pytest.importorskip("torch_pruning")
    if model == "gpt2-small":
        pytest.importorskip("transformers")
    net, sets, per_tensor = _cached(("coupled", model), lambda g: harness.coupled_model(model))
    tensors = list({id(m.tensor.untyped_storage()): p for s in sets for m in s.slices
                    for p in [_base(net, m.tensor)]}.values())
    source = [t.detach().clone() for t in tensors]
    lam = MODEL_LAM
    if impl == "coupled":
        fn = lambda ws: fastprox.coupled_prox_(sets, lam_group=lam)  # noqa: E731
        # each member is read by the sums and read and written by the rewrite (a conv weight
        # is a member of two sets: its output channels' and its input channels')
        moved = [m.tensor for s in sets for m in s.slices]
    elif impl == "per_tensor":
        params = [t.param for t in per_tensor]
        dims = [t.dim for t in per_tensor]
        fn = lambda ws: fastprox.foreach_prox_(params, lam_group=lam, dim=dims)  # noqa: E731
        moved = params
    else:
        fn = lambda ws: torch._foreach_mul_(tensors, 0.999)  # noqa: E731
        moved = tensors
    benchmark.group = f"coupled {model}"
    benchmark.extra_info.update(
        coupled_model=model, impl=impl, sets=len(sets), tensors=len(tensors),
        groups=sum(s.num_groups for s in sets),
        bytes=(3 if impl == "coupled" else 2) * sum(t.numel() * t.element_size() for t in moved))
    with torch.no_grad():
        _time(benchmark, fn, tensors,
              lambda: (torch._foreach_copy_(tensors, source), None)[1], False)


def _base(model, tensor):
    """The parameter of ``model`` whose storage ``tensor`` (a member, maybe a view) uses."""
    for p in model.parameters():
        if p.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            return p
    raise LookupError("a member that is no parameter of the model")


METRIC_IMPLS = ["metric", "euclidean", "reference", "floor"]


@pytest.mark.parametrize("impl", METRIC_IMPLS)
@pytest.mark.parametrize("model", list(MODELS))
def test_metric_step(benchmark, model, impl):
    """Group lasso in an Adam step's metric on every weight of a model (foreach_metric_prox_,
    each weight with its second moment) against the Euclidean step (foreach_prox_), the float64
    reference, and the floor: one read of each weight and its second moment and one write of the
    weight (``torch._foreach_add_``), float32."""
    layout = MODELS[model]()
    dims = [[d] if isinstance(d, int) else list(d) for _, d in layout]
    source, moments = _cached(("metric", model), lambda g: (
        [torch.randn(s, generator=g).mul_(0.02) for s, _ in layout],
        [torch.rand(s, generator=g).mul_(1e-4) for s, _ in layout]))
    work = [w.clone() for w in source]
    n = len(work)
    lams = torch.tensor([(0.0, MODEL_LAM, 0.0)] * n, dtype=torch.float64)
    metric = torch.tensor([(1 / (1 - 0.999 ** 100), 1e-8, 1e-3)] * n, dtype=torch.float64)
    flat, counts = [d for ds in dims for d in ds], [len(ds) for ds in dims]
    if impl == "metric":
        fn = lambda ws: torch.ops.fastprox.foreach_metric_prox_(  # noqa: E731
            ws, moments, lams, metric, flat, counts, [True] * n, [True] * n)
    elif impl == "euclidean":
        fn = lambda ws: fastprox.foreach_prox_(ws, lam_group=1e-3 * MODEL_LAM,  # noqa: E731
                                               dim=[tuple(d) for d in dims])
    elif impl == "reference":
        fn = lambda ws: fastprox.reference.foreach_metric_prox_op(  # noqa: E731
            ws, moments, lams, metric, flat, counts, [True] * n, [True] * n)
    else:
        fn = lambda ws: torch._foreach_add_(ws, moments, alpha=1e-30)  # noqa: E731
    nbytes = sum(w.numel() * w.element_size() for w in work)
    benchmark.group = f"metric {model}"
    benchmark.extra_info.update(
        metric_model=model, impl=impl, tensors=n,
        bytes=(3 if impl in ("metric", "reference", "floor") else 2) * nbytes)
    _time(benchmark, fn, work, lambda: (torch._foreach_copy_(work, source), None)[1],
          impl == "reference")


# -- the proximal step beside the optimizer step and the training step ---------------------------

STEP_MODELS = harness.STEP_MODELS
STEP_IMPLS = ["train", "adamw", "metric", "euclidean", "target"]
STEP_LAM = 1e-4


@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("model", STEP_MODELS)
def test_training_step(benchmark, model, impl):
    """What the proximal step costs in a real training step: a whole step (forward, backward,
    AdamW) without the regularizer, the AdamW step alone, and the regularizer's proximal step
    after it, in the AdamW metric (``prox_step(opt)``, what ``attach`` runs) and Euclidean
    (``prox="euclidean"``), on the same coupled groups, float32. The weights and the optimizer
    state are restored before every round."""
    if model == "resnet50":
        pytest.importorskip("torch_pruning")
    else:
        pytest.importorskip("transformers")
    # "target": the metric step with a SparsityTarget on its ramp (a model of its own: the
    # controller copies the weights before each step and counts every pool after it)
    target = fastprox.SparsityTarget(kept=0.5, by_step=10 ** 6) if impl == "target" else None
    net, reg, loss_fn = _cached(("step", model, impl == "target"), lambda g: harness.step_model(
        model, g, lam=STEP_LAM, target=target))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss_fn().backward()
    opt.step()  # the state the prox reads: one step taken
    saved = [p.detach().clone() for p in params]
    state = {k: v.clone() for p in params for k, v in [(id(p), opt.state[p]["exp_avg_sq"])]}

    def restore():
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            for p in params:
                opt.state[p]["exp_avg_sq"].copy_(state[id(p)])

    if impl == "train":
        def fn(_):
            opt.zero_grad(set_to_none=False)
            loss_fn().backward()
            opt.step()
        rounds = 3
    elif impl == "adamw":
        fn = lambda _: opt.step()  # noqa: E731 (the gradients of the warm-up step)
        rounds = 10
    else:
        prox = "euclidean" if impl == "euclidean" else "metric"
        fn = lambda _: reg.prox_step(opt, prox=prox)  # noqa: E731
        rounds = 5
    benchmark.group = f"step {model}"
    benchmark.extra_info.update(step_model=model, impl=impl,
                                params=sum(p.numel() for p in params),
                                sets=len(reg.coupled), bytes=0)
    fn(None)
    restore()
    benchmark.pedantic(fn, args=(None,), setup=restore, rounds=rounds, warmup_rounds=0)


COMPILED_MODELS = ["gpt2-4l", "llama-4l"]
COMPILED_IMPLS = ["eager", "eager_prox", "compiled", "compiled_prox"]


@pytest.mark.parametrize("impl", COMPILED_IMPLS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("model", COMPILED_MODELS)
def test_compiled_training_step(benchmark, model, optimizer, impl):
    """A whole training step (forward, backward, the optimizer's step, zero_grad) eager and
    under ``torch.compile`` (inductor), without the regularizer and with it attached (coupled
    heads and neurons): AdamW takes the metric step (one region outside the graph), SGD the
    Euclidean step (traced). What the proximal step adds to the compiled step, beside what it
    adds to the eager one. Training goes on between rounds (lam is small: the cost stays)."""
    pytest.importorskip("transformers")
    net, reg, loss_fn = _cached(("compiled", model), lambda g: harness.step_model(
        model, g, lam=STEP_LAM))
    net.loss_type = "ForCausalLM"  # (transformers' default, said without a logged warning)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-2))
    handle = reg.attach(opt) if impl.endswith("_prox") else None

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad()

    torch._dynamo.reset()
    fn = torch.compile(step) if impl.startswith("compiled") else step
    try:
        for _ in range(3):  # compilation, and the recompiles of the first steps
            fn()
        benchmark.group = f"compiled step {model} {optimizer}"
        benchmark.extra_info.update(compiled_model=model, optimizer=optimizer, impl=impl,
                                    params=sum(p.numel() for p in params),
                                    sets=len(reg.coupled), bytes=0)
        benchmark.pedantic(fn, rounds=5, warmup_rounds=0)
    finally:
        if handle is not None:
            handle.remove()
        torch._dynamo.reset()
