"""What sparsity training removed: per layer and total counts, FLOPs, and a history over steps.

Per Linear/conv layer: nonzero weights; input units kept (those with a nonzero outgoing weight
in this layer: a column of a Linear, an input channel of a conv); output units kept (nonzero
row / filter); the regularizer's groups alive (nonzero norm) when a ``Regularizer`` is given;
dense and remaining multiply-add FLOPs per example (2 per weight use; for convs, times the output
positions, known when ``example_input`` is given). For an ``nn.Sequential`` the counts follow
``fastprox.compact``: a unit is kept when the next layer reads it, and remaining FLOPs are those
of the compacted model. Totals: input features kept (of the first layer), hidden units kept (the
inputs of every later layer), nonzero weights, FLOPs.

For coupled groups (fastprox.groups: ResNet channels, transformer neurons and heads),
``coupled_stats`` counts per group: a residual channel is one unit however many layers read it;
FLOPs before and after compaction come from ``torch.utils.flop_counter`` and latency is
measured.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .compaction import plan as _compaction_plan
from . import ops

from ._modules import WEIGHTED as _LAYERS


@dataclasses.dataclass
class LayerStats:
    name: str
    kind: str
    inputs_kept: int
    inputs_total: int
    outputs_kept: int
    outputs_total: int
    nonzero: int
    numel: int
    groups_alive: int | None = None
    groups_total: int | None = None
    flops_dense: int | None = None
    flops_remaining: int | None = None


def _pools(regularizer) -> list | None:
    """A sparsity target's pools (fastprox/target.py), when the regularizer has one."""
    controller = getattr(regularizer, "controller", None)
    return None if controller is None else controller.report()


def _pool_rows(pools) -> list[str]:
    from .target import POOL_HEADER

    return ["", POOL_HEADER, *(p.row() for p in pools)] if pools else []


@dataclasses.dataclass
class SparsityStats:
    layers: list[LayerStats]
    pools: list | None = None  # a sparsity target's pools (target.PoolStats), when there is one

    def _sum(self, field: str):
        values = [getattr(layer, field) for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def input_features_kept(self) -> int:
        return self.layers[0].inputs_kept if self.layers else 0

    @property
    def input_features_total(self) -> int:
        return self.layers[0].inputs_total if self.layers else 0

    @property
    def hidden_units_kept(self) -> int:
        return sum(layer.inputs_kept for layer in self.layers[1:])

    @property
    def hidden_units_total(self) -> int:
        return sum(layer.inputs_total for layer in self.layers[1:])

    @property
    def nonzero(self) -> int:
        return self._sum("nonzero")

    @property
    def numel(self) -> int:
        return self._sum("numel")

    @property
    def flops_dense(self) -> int | None:
        return self._sum("flops_dense")

    @property
    def flops_remaining(self) -> int | None:
        return self._sum("flops_remaining")

    def totals(self) -> dict:
        return {k: getattr(self, k) for k in (
            "input_features_kept", "input_features_total", "hidden_units_kept",
            "hidden_units_total", "nonzero", "numel", "flops_dense", "flops_remaining")}

    def as_dict(self) -> dict:
        return {"layers": [dataclasses.asdict(layer) for layer in self.layers],
                "totals": self.totals(),
                "pools": None if self.pools is None else [dataclasses.asdict(p)
                                                          for p in self.pools]}

    def to_markdown(self) -> str:
        def frac(a, b):
            return "-" if a is None or b is None else f"{a}/{b}"

        rows = ["| layer | type | inputs kept | outputs kept | groups alive | nonzero weights "
                "| FLOPs remaining/dense |", "|---|---|---|---|---|---|---|"]
        for s in self.layers:
            rows.append(f"| {s.name} | {s.kind} | {frac(s.inputs_kept, s.inputs_total)} | "
                        f"{frac(s.outputs_kept, s.outputs_total)} | "
                        f"{frac(s.groups_alive, s.groups_total)} | {frac(s.nonzero, s.numel)} | "
                        f"{frac(s.flops_remaining, s.flops_dense)} |")
        t = self.totals()
        rows.append(f"| total | | {frac(t['input_features_kept'], t['input_features_total'])} "
                    f"(inputs) | {frac(t['hidden_units_kept'], t['hidden_units_total'])} "
                    f"(hidden) | | {frac(t['nonzero'], t['numel'])} | "
                    f"{frac(t['flops_remaining'], t['flops_dense'])} |")
        return "\n".join(rows + _pool_rows(self.pools))


def _output_positions(model: nn.Module, example_input) -> dict[nn.Module, int]:
    """Output positions (H*W...) per conv, from one forward pass with hooks."""
    positions = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out: positions.__setitem__(mod, math.prod(out.shape[2:])))
        for m in model.modules() if isinstance(m, _LAYERS[1:])]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return positions


@torch.no_grad()
def sparsity_stats(model: nn.Module, regularizer=None, example_input=None):
    """Counts of what is left of ``model`` (see the module docstring). With a regularizer built
    with coupled presets (heads, neurons, channels): its ``coupled_stats`` (per coupled set and
    kind, and the target's pools), which counts each group once across the layers it spans."""
    if regularizer is not None and getattr(regularizer, "coupled", None):
        return coupled_stats(regularizer)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    positions = _output_positions(model, example_input) if example_input is not None else {}
    kept_units, kept_inputs = None, None
    if isinstance(model, nn.Sequential):
        try:
            _, kept_inputs, kept_units = _compaction_plan(model)
        except (NotImplementedError, ValueError):
            kept_units = None
    targets = {}
    if regularizer is not None:
        targets = {id(t.param): t for t in regularizer.targets.values()}
    out = []
    for k, (name, m) in enumerate(layers):
        w = m.weight.detach()
        nz_in = int((w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1).sum())
        nz_out = int((w != 0).reshape(w.shape[0], -1).any(dim=1).sum())
        stats = LayerStats(name, type(m).__name__, nz_in, w.shape[1], nz_out, w.shape[0],
                           int((w != 0).sum()), w.numel())
        t = targets.get(id(m.weight))
        if t is not None and t.lam_group + t.lam_exclusive > 0:
            norms = ops.group_norms(w, t.dim)
            stats.groups_alive, stats.groups_total = int((norms != 0).sum()), norms.numel()
        kernel = math.prod(w.shape[2:])  # weights per (output, input) pair: 1 for a Linear
        if kept_units is not None:
            stats.outputs_kept = len(kept_units[name])
            # as compacted: kept outputs x kept input units (each `per_unit` columns wide: the
            # positions of a channel after a Flatten)
            units_in = w.shape[1] if k == 0 else layers[k - 1][1].weight.shape[0]
            per_unit = w.shape[1] // units_in
            kept_in = len(kept_inputs) if k == 0 else len(kept_units[layers[k - 1][0]])
            stats.inputs_kept = kept_in * per_unit
            pairs = len(kept_units[name]) * kept_in * per_unit
        else:
            pairs = nz_out * nz_in
        positions_out = 1 if isinstance(m, nn.Linear) else positions.get(m)
        if positions_out is not None:
            stats.flops_dense = 2 * w.numel() * positions_out
            stats.flops_remaining = 2 * pairs * kernel * positions_out
        out.append(stats)
    return SparsityStats(out, _pools(regularizer))


class SparsityHistory:
    """Records units alive per layer during training; plots them; logs TensorBoard scalars.

    Args:
        model, regularizer, example_input: as ``sparsity_stats``.
        tensorboard: a log directory or a ``SummaryWriter``; scalars ``units_alive/<layer>``
            (the layer's inputs kept), ``groups_alive/<layer>`` and the totals go there.
            Needs ``torch.utils.tensorboard`` (the ``tensorboard`` package).

    Example::

        history = fastprox.SparsityHistory(model, reg)
        for epoch in range(epochs):
            train_one_epoch()
            history.record(epoch, accuracy=acc)
        history.plot("units.png")
    """

    def __init__(self, model: nn.Module, regularizer=None, example_input=None, tensorboard=None):
        self.model, self.regularizer, self.example_input = model, regularizer, example_input
        self.steps: list[int] = []
        self.units: dict[str, list[int]] = {}
        self.totals: list[dict] = []
        self.extra: list[dict] = []
        self.writer = None
        if tensorboard is not None:
            if isinstance(tensorboard, str):
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    raise ImportError("SparsityHistory: TensorBoard logging needs the "
                                      "`tensorboard` package (pip install tensorboard)") from exc
                tensorboard = SummaryWriter(tensorboard)
            self.writer = tensorboard

    def record(self, step: int, **scalars) -> SparsityStats:
        stats = sparsity_stats(self.model, self.regularizer, self.example_input)
        self.steps.append(step)
        for layer in stats.layers:
            self.units.setdefault(layer.name, []).append(layer.inputs_kept)
        self.totals.append(stats.totals())
        self.extra.append(dict(scalars))
        if self.writer is not None:
            for layer in stats.layers:
                self.writer.add_scalar(f"units_alive/{layer.name}", layer.inputs_kept, step)
                if layer.groups_alive is not None:
                    self.writer.add_scalar(f"groups_alive/{layer.name}", layer.groups_alive, step)
            for key, value in {**stats.totals(), **scalars}.items():
                if value is not None:
                    self.writer.add_scalar(f"sparsity/{key}", value, step)
            self.writer.flush()
        return stats

    def plot(self, path, title: str = "units alive per layer"):
        """A PNG of each layer's input units kept over the recorded steps (matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("SparsityHistory.plot needs matplotlib (pip install matplotlib)") \
                from exc
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, values in self.units.items():
            ax.plot(self.steps, values, label=f"{name} inputs")
        ax.set_xlabel("step")
        ax.set_ylabel("units alive")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# -- coupled groups ------------------------------------------------------------------------------
@dataclasses.dataclass
class SetStats:
    """One coupled set: what it removes (``kind``: channels, neurons, heads), where (``module``),
    and its groups alive / total."""

    name: str
    kind: str
    module: str
    alive: int
    total: int


@dataclasses.dataclass
class CoupledStats:
    """What can be removed, counted per coupled group: every unit (a channel, residual ones
    included, a neuron, a head) is one group of one set, so it is counted once however many
    layers read it. With a compacted model and example inputs: parameters, FLOPs (from
    ``torch.utils.flop_counter``, one forward pass) and measured CPU latency (median of
    ``repeats`` forward passes, after a warm-up), dense against compacted."""

    sets: list[SetStats]
    params_dense: int | None = None
    params_compact: int | None = None
    flops_dense: int | None = None
    flops_compact: int | None = None
    latency_dense_ms: float | None = None
    latency_compact_ms: float | None = None
    device: str | None = None
    pools: list | None = None  # a sparsity target's pools (target.PoolStats), when there is one

    def units(self) -> dict[str, tuple[int, int]]:
        """Per kind: (units alive, units total)."""
        out: dict[str, tuple[int, int]] = {}
        for s in self.sets:
            a, t = out.get(s.kind, (0, 0))
            out[s.kind] = (a + s.alive, t + s.total)
        return out

    def as_dict(self) -> dict:
        return {"sets": [dataclasses.asdict(s) for s in self.sets], "units": self.units(),
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("sets", "pools")},
                "pools": None if self.pools is None else [dataclasses.asdict(p)
                                                          for p in self.pools]}

    def to_markdown(self) -> str:
        rows = ["| coupled set | kind | alive / total |", "|---|---|---|"]
        rows += [f"| {s.name} | {s.kind} | {s.alive}/{s.total} |" for s in self.sets]
        for kind, (a, t) in self.units().items():
            rows.append(f"| all {kind} | {kind} | {a}/{t} |")
        if self.params_dense is not None:
            rows.append(f"\nparameters {self.params_compact}/{self.params_dense}")
        if self.flops_dense is not None:
            rows.append(f"FLOPs per forward pass {self.flops_compact}/{self.flops_dense} "
                        "(torch.utils.flop_counter)")
        if self.latency_dense_ms is not None:
            rows.append(f"latency {self.latency_compact_ms:.3f} ms / {self.latency_dense_ms:.3f} "
                        f"ms dense ({self.device}, median)")
        return "\n".join(rows + _pool_rows(self.pools))


def _call(model, inputs, forward_fn):
    if forward_fn is not None:
        return forward_fn(model, inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def count_flops(model: nn.Module, inputs, forward_fn=None) -> int:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.
    PyTorch's fused fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
    (eval mode) is one op the counter has no formula for, so it is switched off while counting:
    the same computation, counted op by op."""
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    counter = FlopCounterMode(display=False)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            _call(model, inputs, forward_fn)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, inputs, forward_fn=None, repeats: int = 20) -> float:
    """Median wall time of one forward pass in milliseconds (after two warm-up passes)."""
    import statistics
    import time

    for _ in range(2):
        _call(model, inputs, forward_fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _call(model, inputs, forward_fn)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def coupled_stats(groups, model: nn.Module | None = None, compacted=None, example_inputs=None,
                  *, forward_fn=None, repeats: int = 20) -> CoupledStats:
    """Counts per coupled set of ``groups`` (a ``fastprox.groups.Found``, a ``Regularizer`` built
    with a coupled preset, or a list of ``CoupledGroups``); with ``model`` (dense),
    ``compacted`` (a ``Compacted`` or the small model) and ``example_inputs``: parameters,
    FLOPs and latency of both (both put in eval mode for the measurement, then restored)."""
    from .compaction import _found_sets

    sets, found_inputs, found_forward = _found_sets(groups)
    stats = CoupledStats([SetStats(s.name, s.unit.kind if s.unit else "", s.unit.module
                                   if s.unit else "", int(s.alive().sum()), s.num_groups)
                          for s in sets], pools=_pools(groups))
    if model is None or compacted is None:
        return stats
    small = getattr(compacted, "model", compacted)
    stats.params_dense = sum(p.numel() for p in model.parameters())
    stats.params_compact = sum(p.numel() for p in small.parameters())
    inputs = example_inputs if example_inputs is not None else found_inputs
    forward_fn = forward_fn or found_forward
    if inputs is None:
        return stats
    modes = (model.training, small.training)
    model.eval()
    small.eval()
    try:
        stats.flops_dense = count_flops(model, inputs, forward_fn)
        stats.flops_compact = count_flops(small, inputs, forward_fn)
        stats.latency_dense_ms = measure_latency(model, inputs, forward_fn, repeats)
        stats.latency_compact_ms = measure_latency(small, inputs, forward_fn, repeats)
        stats.device = str(next(model.parameters()).device)
    finally:
        model.train(modes[0])
        small.train(modes[1])
    return stats
