"""A whole training step under torch.compile with a Regularizer attached to its optimizer
(forward, backward, ``optimizer.step()`` with the proximal step as its post-hook, zero_grad):
which graph breaks and recompiles fastprox adds, read from dynamo's own logs and from
``torch._dynamo.explain``, against the same step without the regularizer.

* the Euclidean step (plain targets and coupled sets, learning rates that are numbers): traced,
  no graph break of fastprox's. It recompiles at most twice: the step count (a Python int) is
  specialised once and then dynamic; compiled from the very first step, the coupled sets'
  first step runs eagerly (it builds their plans, which a trace cannot) and the next traces;
* the metric step (AdamW), a target, or coupled sets with a tensor lr: one region outside the
  graph, one break (``fastprox/steps.py``), no recompile;
* from the fourth step on, nothing compiles, no recompile-limit warning, and the weights are
  those of the same steps taken eagerly.

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


def _compiled_steps(step, args, steps: int):
    """``step`` compiled (dynamo, graphs run as traced) and called ``steps`` times: graph-break
    locations as (file, line), recompiled functions as (name, file), recompile-limit warnings,
    graphs compiled after the first three calls, and whether the graphs of the last call's
    compilations hold fastprox ops (the step traced)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    records = _Records()
    log = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    log.addHandler(records)
    try:
        compiled = torch.compile(step, backend=backend)
        for _ in range(3):
            compiled(*args)
        early = len(graphs)
        for _ in range(steps - 3):
            compiled(*args)
        late = len(graphs) - early
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
    # the graphs compiled last for each frame (after any recompile): fastprox ops in them?
    traced = any("fastprox" in str(n.target) for gm in graphs[-3:] for n in gm.graph.nodes
                 if n.op == "call_function")
    return breaks, recompiles, limits, late, traced


def _ours(breaks) -> set:
    return {where for where in breaks if where[0].startswith(_HERE)}


def _setup(optimizer: str, preset, target: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = gpt2()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
           if optimizer == "sgd-tensor-lr"
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


CASES = [  # (optimizer, preset, target, an eager step first, breaks of fastprox's, recompiles)
    ("sgd", "group_lasso", False, True, 0, 1),
    ("sgd", "sparse_group_lasso", False, True, 0, 1),
    ("sgd", ("heads", "neurons"), False, True, 0, 1),
    ("sgd", ("heads", "neurons"), False, False, 1, 2),  # the first step eager, then traced
    ("sgd-tensor-lr", ("heads", "neurons"), False, True, 1, 0),
    ("sgd", "group_lasso", True, True, 1, 0),
    ("adamw", "group_lasso", False, True, 1, 0),
    ("adamw", ("heads", "neurons"), False, True, 1, 0),
    ("adamw", ("heads", "neurons"), True, True, 1, 0),
]


@pytest.fixture(scope="module")
def baseline():
    out = {}
    for optimizer in ("sgd", "sgd-tensor-lr", "adamw"):
        _, _, _, step, x = _setup(optimizer, None, False)
        out[optimizer] = _compiled_steps(step, (x,), 3)[0]
    return out


@pytest.mark.parametrize(
    "optimizer,preset,target,eager_first,ours,recompiled", CASES,
    ids=[f"{o}-{p if isinstance(p, str) else '+'.join(p)}{'-target' if t else ''}"
         f"{'' if e else '-compiled-from-the-start'}" for o, p, t, e, _, _ in CASES])
def test_a_compiled_training_step_breaks_only_where_fastprox_says(
        baseline, optimizer, preset, target, eager_first, ours, recompiled):
    model, opt, reg, step, x = _setup(optimizer, preset, target)
    twin, twin_opt, twin_reg, twin_step, _ = _setup(optimizer, preset, target)
    steps = 7
    if eager_first:
        step(x)
        twin_step(x)
        steps -= 1
    breaks, recompiles, limits, late, traced = _compiled_steps(step, (x,), steps)
    for _ in range(steps):
        twin_step(x)
    found = _ours(breaks)
    assert len(found) == ours, breaks
    if ours:  # the one region: the step taken outside the graph
        assert {os.path.basename(f) for f, _ in found} == {"steps.py"}
    # every other break is one the same step takes without the regularizer
    assert set(breaks) - found <= set(baseline[optimizer]), breaks
    assert not limits, limits
    assert len(recompiles) <= recompiled, recompiles
    assert late == 0  # from the fourth step on, nothing compiles
    # the step's ops are in the last graphs (traced), or all outside them (the region)
    assert traced == (ours == 0 or not eager_first)
    assert reg.steps == twin_reg.steps == 7
    # the eager steps' values (to rounding: torch's compiled optimizer steps take another
    # code path), with the same entries zero
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert torch.equal(a == 0, b == 0)
    # the proximal step was taken: the weights are not those of the same steps without it
    bare, _, _, bare_step, _ = _setup(optimizer, None, False)
    for _ in range(7):
        bare_step(x)
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
               for a, b in zip(model.parameters(), bare.parameters()))


@pytest.mark.parametrize("optimizer,preset,graphs", [
    ("sgd", "group_lasso", 1), ("sgd", ("heads", "neurons"), 1),
    ("adamw", "group_lasso", 0), ("adamw", ("heads", "neurons"), 0)])
def test_explain_counts_the_step_as_one_graph_or_none(optimizer, preset, graphs):
    """``torch._dynamo.explain`` of the whole step: the Euclidean step is one graph of its own (it follows the optimizer step's own break, so it cannot join that graph)
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


@pytest.mark.parametrize("target", [False, True], ids=["gates", "gates-target"])
def test_l0_gates_compile_with_their_step(target):
    """L0 gates in a compiled training step (their forward, the expected-L0 penalty, the clamp
    after the step): no break of fastprox's; with a target, its controller is one region
    outside the graph (``fastprox/l0.py``)."""
    from fastprox.l0 import L0Regularizer, add_l0_gates

    torch.manual_seed(2)
    model = add_l0_gates(torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 4)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg = L0Regularizer(model, lam=0.1, train_size=100,
                        target=fastprox.SparsityTarget(0.5, by_step=4) if target else None)
    reg.attach(opt)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))

    def step(x, y):
        loss = F.cross_entropy(model(x), y) + reg.penalty()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    step(x, y)
    breaks, recompiles, limits, late, traced = _compiled_steps(step, (x, y), 6)
    found = _ours(breaks)
    assert {os.path.basename(f) for f, _ in found} == ({"l0.py"} if target else set()), breaks
    assert len(found) == int(target)
    # with a target: its strengths (Python floats the penalty reads) specialised once, then
    # dynamic
    assert not limits and len(recompiles) <= int(target) and late == 0, (recompiles, limits)
    if target:
        assert reg.controller.steps == 7


@pytest.mark.parametrize("eager_first", [False, True], ids=["fresh", "planned"])
def test_coupled_prox_called_in_a_compiled_function(eager_first):
    """``fastprox.coupled_prox_`` in a compiled function: the eager result, whether its plans
    were built by an eager call before (then the call is traced, no break) or not (then they
    are built as eagerly, breaking the graph there)."""
    from helpers import TinyMLP

    def build():
        torch.manual_seed(3)
        model = TinyMLP()
        reg = fastprox.Regularizer(model, "neurons", lam=0.1)
        return model, [t.groups for t in reg.coupled.values()]

    model, sets = build()
    twin, twin_sets = build()

    def step(groups, lam):
        with torch.no_grad():
            fastprox.coupled_prox_(groups, lam_group=lam)

    if eager_first:
        step(sets, 0.01)
        step(twin_sets, 0.01)
    breaks, _, limits, _, traced = _compiled_steps(lambda: step(sets, 0.3), (), 4)
    for _ in range(4):
        step(twin_sets, 0.3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert (model.up.weight == 0).all(dim=1).any()  # the step did remove units
    assert not limits
    assert traced  # the fused ops are in the graphs either way
    assert (not _ours(breaks)) == eager_first, breaks  # planned: no break of fastprox's
