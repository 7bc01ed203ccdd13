"""A whole training step under torch.compile with a Regularizer attached to its optimizer
(forward, backward, ``optimizer.step()`` with the proximal step as its post-hook, zero_grad):
which graph breaks and recompiles fastprox adds, read from dynamo's own logs and from
``torch._dynamo.explain``, against the same step without the regularizer.

* the Euclidean step of plain targets: traced, no graph break of fastprox's; it recompiles at
  most once (the step count, a Python int, specialised once and then dynamic);
* the metric step (AdamW), coupled sets and a target: one region outside the graph, one break
  (``fastprox/steps.py``), no recompile;
* after that, no step compiles anything, no recompile-limit warning, and the weights are those
  of the same steps taken eagerly.

The breaks torch itself takes in such a step (``loss.backward()``, the optimizer step's own
``graph_break()`` calls, ``zero_grad``) are the baseline's, and are left alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import fastprox
from models import gpt2

_HERE = os.path.dirname(fastprox.__file__) + os.sep


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _compiled_steps(step, args, steps: int, backend="eager"):
    """``step`` compiled and called ``steps`` times: (graph-break locations as (file, line),
    recompiled functions as (name, file), recompile-limit warnings, graphs compiled after the
    first two calls)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    records = _Records()
    log = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    log.addHandler(records)
    try:
        compiled = torch.compile(step, backend=counter)
        compiled(*args)
        compiled(*args)
        frames = counter.frame_count
        for _ in range(steps - 2):
            compiled(*args)
        late = counter.frame_count - frames
    finally:
        log.removeHandler(records)
        torch._logging.set_logs()
        torch._dynamo.reset()
    breaks = Counter()
    for m in records.messages:
        if m.lstrip().startswith("Graph break"):
            at = re.search(r"in user code at (\S+):(\d+)", m)
            breaks[(at.group(1), int(at.group(2))) if at else ("?", 0)] += 1
    recompiles = [re.search(r"Recompiling function (\S+) in (\S+)", m).groups()
                  for m in records.messages if "Recompiling function" in m]
    limits = [m for m in records.messages if "recompile_limit" in m]
    return breaks, recompiles, limits, late


def _ours(breaks) -> set:
    return {where for where in breaks if where[0].startswith(_HERE)}


def _setup(optimizer: str, preset, target: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = gpt2()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    reg = None
    if preset is not None:
        reg = fastprox.Regularizer(
            model, preset, lam=1e-2,
            target=fastprox.SparsityTarget(0.5, by_step=4) if target else None)
        reg.attach(opt)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))

    def step(x):
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return model, opt, reg, step, x


CASES = [  # (optimizer, preset, target, breaks of fastprox's)
    ("sgd", "group_lasso", False, 0),
    ("sgd", "sparse_group_lasso", False, 0),
    ("sgd", ("heads", "neurons"), False, 1),
    ("sgd", "group_lasso", True, 1),
    ("adamw", "group_lasso", False, 1),
    ("adamw", ("heads", "neurons"), False, 1),
    ("adamw", ("heads", "neurons"), True, 1),
]


@pytest.fixture(scope="module")
def baseline():
    _, _, _, step, x = _setup("sgd", None, False)
    sgd = _compiled_steps(step, (x,), 3)[0]
    _, _, _, step, x = _setup("adamw", None, False)
    return {"sgd": sgd, "adamw": _compiled_steps(step, (x,), 3)[0]}


@pytest.mark.parametrize("optimizer,preset,target,ours", CASES,
                         ids=[f"{o}-{p if isinstance(p, str) else '+'.join(p)}"
                              f"{'-target' if t else ''}" for o, p, t, _ in CASES])
def test_a_compiled_training_step_breaks_only_where_fastprox_says(baseline, optimizer, preset,
                                                                   target, ours):
    model, opt, reg, step, x = _setup(optimizer, preset, target)
    twin, twin_opt, twin_reg, twin_step, _ = _setup(optimizer, preset, target)
    breaks, recompiles, limits, late = _compiled_steps(step, (x,), 6)
    for _ in range(6):
        twin_step(x)
    found = _ours(breaks)
    assert len(found) == ours, breaks
    if ours:  # the one region: the step taken outside the graph
        assert {os.path.basename(f) for f, _ in found} == {"steps.py"}
    # every other break is one the same step takes without the regularizer
    assert set(breaks) - found <= set(baseline[optimizer]), breaks
    assert not limits, limits
    allowed = 1 if ours == 0 else 0  # plain Euclidean: the step count made dynamic, once
    assert len(recompiles) <= allowed, recompiles
    assert late == 0  # from the third step on, nothing compiles
    assert reg.steps == twin_reg.steps == 6
    # the eager steps' values (to rounding: torch's compiled optimizer steps take another
    # code path), with the same entries zero
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(a == 0, b == 0)
    # the proximal step was taken: the weights are not those of the same steps without it
    bare, _, _, bare_step, _ = _setup(optimizer, None, False)
    for _ in range(6):
        bare_step(x)
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in zip(model.parameters(), bare.parameters()))


@pytest.mark.parametrize("optimizer,preset,graphs", [
    ("sgd", "group_lasso", 1), ("sgd", ("heads", "neurons"), 0),
    ("adamw", "group_lasso", 0), ("adamw", ("heads", "neurons"), 0)])
def test_explain_counts_the_step_as_one_graph_or_none(optimizer, preset, graphs):
    """``torch._dynamo.explain`` of the whole step: the Euclidean step of plain targets is one
    graph of its own (it follows the optimizer step's own break, so it cannot join that graph)
    and the regularizer adds no other; the region adds none. The step alone: no break."""
    _, opt, _, step, x = _setup(optimizer, None, False)
    step(x)
    bare = torch._dynamo.explain(step)(x)
    _, opt, reg, step, x = _setup(optimizer, preset, False)
    step(x)
    attached = torch._dynamo.explain(step)(x)
    assert attached.graph_count == bare.graph_count + graphs
    alone = torch._dynamo.explain(lambda: reg.prox_step(opt))()
    assert alone.graph_count == graphs and alone.graph_break_count == graphs - 1


def test_a_compiled_step_under_inductor_matches_eager():
    """The real compiler: a block MLP's step with AdamW, the neurons preset and a target, compiled
    by inductor, takes the eager step's values (the region runs eagerly, the rest is
    compiled)."""
    from helpers import TinyMLP

    def build():
        torch.manual_seed(1)
        model = TinyMLP()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        reg = fastprox.Regularizer(model, "neurons", lam=1e-2,
                                   target=fastprox.SparsityTarget(0.5, by_step=5))
        reg.attach(opt)
        return model, opt, reg

    x, y = torch.randn(32, 6), torch.randn(32, 6)

    def stepper(model, opt):
        def step(x, y):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        return step

    model, opt, reg = build()
    twin, twin_opt, twin_reg = build()
    torch._dynamo.reset()
    compiled = torch.compile(stepper(model, opt))
    eager = stepper(twin, twin_opt)
    for _ in range(8):
        compiled(x, y)
        eager(x, y)
    torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(a == 0, b == 0)
    assert (model.up.weight == 0).all(dim=1).sum() == 4  # the target: half the 8 units
    assert reg.steps == twin_reg.steps == 8
    assert reg.controller.reached == twin_reg.controller.reached
