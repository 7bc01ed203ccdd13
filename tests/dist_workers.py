"""What the ranks of tests/dist_pool.py run: each function runs on every rank of a gloo process
group on the CPU and returns what the test compares (in the test process)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import fastprox
import fastprox.distributed
import helpers
from fastprox.distributed import CollectiveCounter

_MESHES: dict[tuple, object] = {}


def mesh(shape: tuple | None = None):
    shape = tuple(shape or (dist.get_world_size(),))
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def placements(spec) -> list:
    """("S0", "R", "S1") -> [Shard(0), Replicate(), Shard(1)]."""
    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec]


def shard(full: torch.Tensor, spec, mesh_shape=None) -> DTensor:
    return distribute_tensor(full, mesh(mesh_shape), placements(spec))


def run_op(op_index: int, full: torch.Tensor, spec, dim, lams, mesh_shape=None):
    """One operator of helpers.OPS on a DTensor: the full result and the collectives issued."""
    w = shard(full, spec, mesh_shape)
    with CollectiveCounter() as comm:
        out = helpers.run(helpers.OPS[op_index], w, lams, dim)
    assert out is w
    return w.full_tensor(), comm.records


def foreach(fulls, specs, dims, kwargs, mesh_shape=None):
    """fastprox.foreach_prox_ on a list of DTensors (fastprox.distributed's, for its own
    arguments): full results, collectives, and the warnings raised."""
    ws = [shard(f, s, mesh_shape) for f, s in zip(fulls, specs)]
    prox = fastprox.distributed.foreach_prox_ if "max_newton_steps" in kwargs \
        else fastprox.foreach_prox_
    with CollectiveCounter() as comm, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prox(ws, dim=dims, **kwargs)
    return [w.full_tensor() for w in ws], comm.records, [str(w.message) for w in caught]


def sharded_group_norms(full, spec, dim):
    w = shard(full, spec)
    norms = fastprox.group_norms(w, dim)
    return norms.full_tensor(), [repr(p) for p in norms.placements]


def bad_inputs():
    """Each bad call's exception (type, message); the weight must be untouched by all."""
    w = shard(torch.randn(6, 4), ("S0",))
    before = w.to_local().clone()
    partial = DTensor.from_local(torch.randn(6, 4), mesh(), [Partial()])
    partial_before = partial.to_local().clone()
    calls = {
        "negative": lambda: fastprox.group_shrink_(w, -1.0, dim=0),
        "nan": lambda: fastprox.exclusive_shrink_(w, float("nan"), dim=0),
        "dim": lambda: fastprox.group_shrink_(w, 0.1, dim=2),
        "partial": lambda: fastprox.foreach_prox_([w, partial], lam_group=0.1, dim=0),
        "steps": lambda: fastprox.distributed.foreach_prox_([w], lam_exclusive=0.1,
                                                          max_newton_steps=0),
        "complex": lambda: fastprox.group_shrink_(w, torch.tensor(1j), dim=0),
        "int": lambda: fastprox.group_shrink_(shard(torch.ones(4, 4, dtype=torch.int32),
                                                    ("S0",)), 0.1),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as exc:  # noqa: BLE001 (the test checks type and message)
            out[name] = (type(exc).__name__, str(exc))
    assert torch.equal(w.to_local(), before) and torch.equal(partial.to_local(), partial_before)
    return out


# -- training ----------------------------------------------------------------------------------

def mlp() -> nn.Sequential:
    # 13 and 7 rows: uneven Shard(0) shards on 2 and 3 ranks
    return nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def train(model, params_model, x, y, steps: int, preset: str, lam: float, overrides=None,
          snapshot_at: int | None = None):
    """SGD with momentum and the proximal regularizer attached; full-batch steps on (x, y).
    Returns the regularizer and the parameters after ``snapshot_at`` steps (if given)."""
    opt = torch.optim.SGD(params_model.parameters(), lr=0.1, momentum=0.9)
    reg = fastprox.Regularizer(params_model, preset, lam, overrides=overrides)
    reg.attach(opt)
    snapshot = None
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step + 1 == snapshot_at:
            snapshot = {n: p.detach().clone() for n, p in params_model.named_parameters()}
    return reg, snapshot


def ddp_train(state, x, y, steps, preset, lam, snapshot_at):
    """DDP on gloo, each rank its slice of the batch: the parameters after ``snapshot_at`` steps
    and at the end."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    model = mlp()
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    _, snapshot = train(ddp, model, xs, ys, steps, preset, lam, snapshot_at=snapshot_at)
    return snapshot, {n: p.detach().clone() for n, p in model.named_parameters()}


def fsdp_mlp(state) -> nn.Sequential:
    """The MLP with ``state``, under FSDP2's fully_shard per Linear and at the root."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    model.load_state_dict(state)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh())
    fully_shard(model, mesh=mesh())
    return model


def fsdp_train(state, x, y, steps, preset, lam, overrides):
    """FSDP2 (fully_shard per Linear and at the root): full parameters after training, the
    penalty of the trained model and its gradient, and the collectives of proximal steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fsdp_mlp(state)
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),)
               for p in model.parameters())
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    reg, _ = train(model, model, xs, ys, steps, preset, lam, overrides)
    with CollectiveCounter() as comm:
        reg.prox_step(lr=0.0)  # thresholds 0: no work, no communication
    idle = comm.records
    with CollectiveCounter() as comm:
        reg.prox_step(lr=1e-3)
    model.zero_grad(set_to_none=True)
    penalty = reg.penalty()
    penalty.backward()  # the penalty's gradient reaches the sharded parameters
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    return params, penalty.item(), grads, idle, comm.records


def adamw_train(model, x, y, steps: int, lam: float):
    """AdamW with group lasso attached (the step in AdamW's metric), full-batch steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reg = fastprox.Regularizer(model, "group_lasso", lam, overrides={"2": {"dim": 1}})
    reg.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return reg


def fsdp_adamw_train(state, x, y, steps, lam):
    """FSDP2 and AdamW: the full parameters after training with the metric step attached (each
    rank the whole batch, so that the run equals one process's)."""
    model = fsdp_mlp(state)
    adamw_train(model, x, y, steps, lam)
    return {n: p.full_tensor() for n, p in model.named_parameters()}
