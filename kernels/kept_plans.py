"""Launch plans kept between steps. A step over the same weights as before (the same
addresses, shapes, strides, dtypes, reduced dims, flags and thresholds that may be nonzero) on
the same device launches what it launched then: a training step's proximal step analyzes its
layouts, forms its buckets, chooses its tiles, finds its tables and tunes its launches once,
and at every later step only launches.

A kept plan holds no weight, moment or table of the step: in their places its launches hold
slots, filled at each launch from the call's arguments (a bucket's first weight and moment, by
their row; the thresholds' and the metric's tables). What it keeps (the launch tables, found
in the upload cache of kernels/tables.py, and scratch buffers of its own) depends on its key
(the layouts) and the tiling limits alone: tensors freed and others made at the same
addresses with the same layouts are launched on as the first ones were. Not kept, planned at
every call: steps whose weights or moments need working copies (a layout no kernel addresses
in place: the copy is made, and written back, per call) and steps captured in a CUDA graph
(tables a capture reads must outlive it: the upload cache keeps those itself). A kept plan's
scratch buffers (the split path's partial sums) serve one call at a time: steps over the same
weights on two streams at once are not supported.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from . import tiles
from .tiles import address

CAPACITY = 64  # plans kept (a model's step needs one per op call: a few)


def limits() -> tuple:
    """The tiling limits of kernels/tiles.py a plan was chosen under (read at every call: the
    kernel tests shrink them to force the engine's paths on small shapes)."""
    return (tiles.TILE_ELEMS, tiles.ONE_TILE_ELEMS, tiles.LOOP_ELEMS, tiles.PROGRAMS_PER_SM,
            tiles.SPLIT_BELOW_BLOCKS, tiles.SPLIT_ELEMS, tiles.SOFT_BLOCK,
            tiles.ELEMS_PER_THREAD, tiles.WIDE_ROWS_PER_TILE, tuple(tiles.MAX_WARPS.items()))


def tensor_key(t: torch.Tensor) -> tuple:
    """What a launch reads of a tensor it addresses: its address, shape, strides and dtype."""
    return (address(t), tuple(t.shape), t.stride(), t.dtype)


class _Slot:
    """A place in a kept launch's arguments for a tensor of the call: ``name`` says which."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


@dataclasses.dataclass
class KeptRun:
    """The launches of one bucket, with slots for the call's tensors, and the configuration
    they were tuned to."""

    launches: list
    config: dict


def kept_run(launches, slots: dict, config: dict) -> KeptRun:
    """``launches`` with each tensor named in ``slots`` ({id(tensor): name}) replaced by a
    slot of that name."""
    out = []
    for la in launches:
        args = tuple(_Slot(slots[id(a)]) if isinstance(a, torch.Tensor) and id(a) in slots
                     else a for a in la.args)
        out.append(dataclasses.replace(la, args=args))
    return KeptRun(out, config)


def launch(run: KeptRun, fill) -> None:
    """Launches a kept run, each slot filled with ``fill(name)``."""
    for la in run.launches:
        args = tuple(fill(a.name) if isinstance(a, _Slot) else a for a in la.args)
        dataclasses.replace(la, args=args).run(run.config)


def step_key(kind: str, device, sms: int, rows) -> tuple | None:
    """The key of a step's plan: its kind, device, SM count, the tiling limits and ``rows`` (a
    tuple per weight); None (no plan kept or found) during CUDA graph capture."""
    if tiles.capturing():
        return None
    return (kind, device, sms, limits()) + tuple(rows)


def launch_kept(key, fill) -> bool:
    """Launches the plan kept under ``key`` (None: none) with ``fill``; whether there was one."""
    runs = plans.get(key) if key is not None else None
    if runs is None:
        return False
    for run in runs:
        launch(run, fill)
    return True


class KeptPlans:
    """Kept plans by key, the least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.plans: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
        return plan

    def keep(self, key, runs: list[KeptRun]) -> None:
        self.plans[key] = runs
        self.plans.move_to_end(key)
        while len(self.plans) > self.capacity:
            self.plans.popitem(last=False)


plans = KeptPlans()
