"""A sparsity target instead of a strength: ``Regularizer(model, preset, lam, target=...)`` or
``L0Regularizer(..., target=...)``.

``SparsityTarget(kept=0.5, by_step=N)`` asks that a fraction ``kept`` of what ``measure`` counts
be left at step ``N``:

* ``"units"``: groups alive (the units of the regularized layers: input units / channels of each
  weight for the plain presets, coupled groups for the coupled presets, open gates for L0), in
  total or, with ``per_layer=True``, in every layer;
* ``"params"``: weights (and biases) of the Linear / conv layers of the compacted model;
* ``"flops"``: their FLOPs per example (``fastprox.sparsity_stats``; conv layers need
  ``example_input``).

``params`` and ``flops`` are counted by ``fastprox.sparsity_stats``, which serves the plain
presets on ``nn.Sequential`` models; other models take ``"units"``.

The controller (dual ascent, as CoFi and Sheared-LLaMA do for their L0 masks): the goal falls
linearly from 1 at step ``start`` to ``kept`` at ``by_step``; every ``every`` steps the measured
fraction ``k`` is compared with it and the strengths are scaled by ``exp(rate * (k - goal) /
(1 - kept))`` (a step of dual ascent on log lam: too much left raises the strength, too little
lowers it). At ``by_step`` (with ``hold=True``) the weakest groups still alive are removed until
the target is met (the ascent leaves a few percent to trim), the mask is held (removed groups are
reset to zero after every step) and the strengths drop to 0, so that what is left recovers from
the shrinkage. ``controller.reached`` is the fraction measured then.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import ops

MEASURES = ("units", "params", "flops")


@dataclasses.dataclass
class SparsityTarget:
    """What to reach and when (see the module docstring)."""

    kept: float
    by_step: int
    measure: str = "units"
    per_layer: bool = False
    layers: tuple | None = None  # names of the targets (or L0 gates' layers) counted; None: all
    start: int = 0
    every: int = 1  # each measurement reads every controlled weight once (group norms)
    rate: float = 0.02
    hold: bool = True
    example_input: object = None

    def __post_init__(self):
        fn = "SparsityTarget"
        if isinstance(self.kept, bool) or not isinstance(self.kept, (int, float)) \
                or not 0 < self.kept <= 1:
            raise ValueError(f"{fn}: kept must be a fraction in (0, 1], got {self.kept!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"{fn}: measure must be one of {MEASURES}, got {self.measure!r}")
        for name in ("by_step", "start", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{fn}: {name} must be an int >= 0, got {value!r}")
        if self.every < 1 or self.by_step <= self.start:
            raise ValueError(f"{fn}: needs every >= 1 and by_step > start, got every="
                             f"{self.every}, start={self.start}, by_step={self.by_step}")
        if not (isinstance(self.rate, (int, float)) and self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"{fn}: rate must be a number > 0, got {self.rate!r}")
        if self.per_layer and self.measure != "units":
            raise ValueError(f"{fn}: per_layer counts units; measure must be 'units'")
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def goal(self, step: int) -> float:
        ramp = min(max((step - self.start) / (self.by_step - self.start), 0.0), 1.0)
        return 1.0 - (1.0 - self.kept) * ramp


@dataclasses.dataclass
class _Unit:
    """One controlled layer: its groups (``alive``, ``scores``), how to remove some, its
    strengths (``scale``), and a copy of its tensors to undo a trial removal (``snapshot``,
    ``restore``)."""

    name: str
    alive: object
    scores: object
    remove: object
    scale: object
    snapshot: object
    restore: object


class Controller:
    """Drives the strengths of a regularizer toward a ``SparsityTarget`` (module docstring).

    ``layers`` (built by the regularizer): per controlled layer, ``alive() -> bool tensor`` per
    group, ``scores() -> float tensor`` (smaller goes first when trimming), ``remove(mask)``
    zeroes the groups of a bool mask, ``scale(s)`` sets its strengths to ``s`` times their base.
    ``count(measure)`` gives (left, dense) for "params" / "flops"."""

    def __init__(self, target: SparsityTarget, layers: list[_Unit], count=None):
        if not layers:
            raise ValueError("SparsityTarget: nothing to control (no regularized layer matches)")
        if target.measure != "units" and count is None:
            raise ValueError(f"SparsityTarget: measure {target.measure!r} is counted by "
                             "fastprox.sparsity_stats, which serves the plain presets on "
                             "nn.Sequential models; use measure='units'")
        self.target, self.layers, self.count = target, layers, count
        self.log_scale = [0.0] * (len(layers) if target.per_layer else 1)
        self.steps = 0
        self.held: list[torch.Tensor] | None = None
        self.reached: float | list[float] | None = None
        self.history: list[tuple[int, float]] = []

    # -- measuring -------------------------------------------------------------------------------
    def fractions(self) -> list[float]:
        """What is left: one fraction (or one per layer with per_layer)."""
        t = self.target
        if t.measure != "units":
            left, dense = self.count(t.measure)
            return [left / dense if dense else 1.0]
        alive = [layer.alive() for layer in self.layers]
        if t.per_layer:
            return [float(a.sum()) / max(a.numel(), 1) for a in alive]
        total = sum(a.numel() for a in alive)
        return [sum(float(a.sum()) for a in alive) / max(total, 1)]

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        t = self.target
        if self.held is not None:
            for layer, mask in zip(self.layers, self.held):
                layer.remove(~mask)
            return
        if t.hold and self.steps >= t.by_step:
            self._hold()
            return
        if self.steps % t.every:
            return
        goal = t.goal(self.steps)
        fractions = self.fractions()
        self.history.append((self.steps, fractions[0] if len(fractions) == 1 else
                             sum(fractions) / len(fractions)))
        span = max(1.0 - t.kept, 1e-3)
        for i, k in enumerate(fractions):
            self.log_scale[i] = min(max(self.log_scale[i] + t.rate * (k - goal) / span, -30.0),
                                    30.0)
        self._apply()

    def _apply(self) -> None:
        for i, layer in enumerate(self.layers):
            s = self.log_scale[i if self.target.per_layer else 0]
            layer.scale(math.exp(s) if self.held is None else 0.0)

    def _hold(self) -> None:
        """Trims the weakest groups to the target, holds the mask, strengths to 0."""
        t = self.target
        groups = [self.layers] if not t.per_layer else [[layer] for layer in self.layers]
        for layers in groups:
            self._trim(layers)
        self.held = [layer.alive() for layer in self.layers]
        self._apply()
        fractions = self.fractions()
        self.reached = fractions[0] if not t.per_layer else fractions

    def _trim(self, layers: list[_Unit]) -> None:
        t = self.target
        alive = [layer.alive() for layer in layers]
        scores = [torch.where(a, layer.scores().float().cpu(), math.inf)
                  for a, layer in zip(alive, layers)]
        flat = torch.cat([s.reshape(-1) for s in scores])
        order = torch.argsort(flat, stable=True)
        n_alive = int(sum(int(a.sum()) for a in alive))
        total = flat.numel()

        def masks(k: int) -> list[torch.Tensor]:
            drop = torch.zeros(total, dtype=torch.bool)
            drop[order[:k]] = True
            out, offset = [], 0
            for s in scores:
                out.append(drop[offset:offset + s.numel()].reshape(s.shape))
                offset += s.numel()
            return out

        if t.measure == "units":
            k = max(n_alive - math.floor(t.kept * total + 1e-9), 0)
            for layer, mask in zip(layers, masks(k)):
                layer.remove(mask)
            return
        left, dense = self.count(t.measure)
        if left <= t.kept * dense:
            return
        # the fewest weakest groups whose removal meets the target (binary search, each try
        # measured on the model and undone)
        saved = [layer.snapshot() for layer in layers]
        lo, hi = 0, n_alive
        while lo < hi:
            mid = (lo + hi) // 2
            for layer, mask in zip(layers, masks(mid)):
                layer.remove(mask)
            left, _ = self.count(t.measure)
            for layer, state in zip(layers, saved):
                layer.restore(state)
            if left <= t.kept * dense:
                hi = mid
            else:
                lo = mid + 1
        for layer, mask in zip(layers, masks(lo)):
            layer.remove(mask)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"target": dataclasses.asdict(self.target) | {"example_input": None},
                "log_scale": list(self.log_scale), "steps": self.steps,
                "held": None if self.held is None else [m.clone() for m in self.held],
                "reached": self.reached, "history": list(self.history)}

    def load_state_dict(self, state) -> None:
        """Restores what ``state_dict`` saved, after checking all of it (``check_state``):
        a state that does not fit this controller changes nothing."""
        self.set_state(self.check_state(state))

    def set_state(self, checked: tuple) -> None:
        """Takes a state ``check_state`` returned."""
        self.log_scale, self.steps, self.held, self.reached, self.history = checked
        self._apply()

    def check_state(self, state, fn: str = "SparsityTarget.load_state_dict") -> tuple:
        """The values of a saved state, checked against this controller (its layers' group
        counts, the target's measure and layers), as (log_scale, steps, held, reached,
        history); ValueError / TypeError naming the entry otherwise."""
        if not isinstance(state, dict):
            raise TypeError(f"{fn}: the state must be a dict (what state_dict() returns), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("log_scale", "steps", "held", "reached", "history")
                   if k not in state]
        if missing:
            raise ValueError(f"{fn}: the state lacks {missing}; it is not a controller's state")
        saved = state.get("target")
        if isinstance(saved, dict):
            for key in ("measure", "per_layer", "layers"):
                mine = getattr(self.target, key)
                theirs = saved.get(key)
                theirs = tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs
                if key in saved and theirs != mine:
                    raise ValueError(f"{fn}: the saved target has {key}={theirs!r}, this one "
                                     f"{mine!r}; a state counts what its own target counts")
        log_scale = state["log_scale"]
        if not isinstance(log_scale, (list, tuple)) or len(log_scale) != len(self.log_scale) \
                or not all(_finite_number(v) for v in log_scale):
            raise ValueError(f"{fn}: log_scale must be a list of {len(self.log_scale)} finite "
                             f"numbers (one per {'layer' if self.target.per_layer else 'pool'}), "
                             f"got {log_scale!r}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
        held = state["held"]
        if held is not None:
            if not isinstance(held, (list, tuple)) or len(held) != len(self.layers):
                count = len(held) if isinstance(held, (list, tuple)) else type(held).__name__
                raise ValueError(f"{fn}: held must be None or one mask per controlled layer "
                                 f"({len(self.layers)}), got {count}")
            checked = []
            for layer, mask in zip(self.layers, held):
                shape = tuple(layer.alive().shape)
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                        or tuple(mask.shape) != shape:
                    got = (f"{mask.dtype} of shape {tuple(mask.shape)}"
                           if isinstance(mask, torch.Tensor) else type(mask).__name__)
                    raise ValueError(f"{fn}: the held mask of {layer.name} must be a bool "
                                     f"tensor of shape {shape} (one entry per group), got "
                                     f"{got}: a state from a model of another width?")
                checked.append(mask.detach().to("cpu").clone())
            held = checked
        reached = state["reached"]
        if not (reached is None or _finite_number(reached) or (
                isinstance(reached, (list, tuple)) and all(_finite_number(v) for v in reached))):
            raise ValueError(f"{fn}: reached must be None, a number or a list of numbers, got "
                             f"{reached!r}")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and _finite_number(h[0])
                and _finite_number(h[1]) for h in history):
            raise ValueError(f"{fn}: history must be a list of (step, fraction) pairs")
        return (list(log_scale), steps, held,
                list(reached) if isinstance(reached, (list, tuple)) else reached,
                [tuple(h) for h in history])


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)


# -- the layers of each regularizer --------------------------------------------------------------

def _broadcast(mask: torch.Tensor, weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    for d in dims:
        mask = mask.unsqueeze(d)
    return mask.to(weight.device)


def plain_layer(target, dims: list[int]) -> _Unit:
    """A plain target of a Regularizer: its groups along ``dims``."""
    base = (target.lam_l1, target.lam_group, target.lam_exclusive)
    w = target.param

    def alive():
        return (ops.group_norms(w.detach(), tuple(dims)) != 0).cpu() if dims else \
            (w.detach() != 0).cpu()

    def scores():
        norms = ops.group_norms(w.detach(), tuple(dims)).float() if dims else w.detach().abs()
        n = math.prod(w.shape[d] for d in dims)
        return norms / (math.sqrt(n) if target.size_weighted else 1.0)

    def remove(mask):
        w.data.mul_(~_broadcast(mask, w, dims))

    def scale(s):
        target.lam_l1, target.lam_group, target.lam_exclusive = (s * b for b in base)

    return _Unit(target.name, alive, scores, remove, scale, lambda: w.detach().clone(),
                 lambda state: w.data.copy_(state))


def coupled_layer(target) -> _Unit:
    """A coupled set of a Regularizer: its groups over every member."""
    base = (target.lam_l1, target.lam_group, target.lam_exclusive)
    g = target.groups

    def scores():
        n = g.sizes.to(torch.float64).clamp(min=1)
        return g.norms().detach().cpu().double() / (n.sqrt() if target.size_weighted else 1.0)

    def remove(mask):
        for m in g.slices:
            dead = mask[m.index].to(m.tensor.device)
            view = m.tensor.data.movedim(m.axis, 0)
            view[dead] = 0

    def scale(s):
        target.lam_l1, target.lam_group, target.lam_exclusive = (s * b for b in base)

    def restore(state):
        for m, saved in zip(g.slices, state):
            m.tensor.data.copy_(saved)

    return _Unit(target.name, g.alive, scores, remove, scale,
                 lambda: [m.tensor.detach().clone() for m in g.slices], restore)


def sequential_count(model, example_input, sparsity_stats):
    """(left, dense) params or FLOPs of the compacted model, from ``sparsity_stats``
    (fastprox.stats, passed in: it imports compaction, which imports the L0 gates)."""

    def count(measure: str) -> tuple[float, float]:
        stats = sparsity_stats(model, None, example_input=example_input)
        if measure == "flops":
            if stats.flops_dense is None:
                raise ValueError("SparsityTarget: FLOPs of conv layers need example_input")
            return float(stats.flops_remaining), float(stats.flops_dense)
        left = dense = 0
        for layer in stats.layers:
            per_pair = layer.numel // max(layer.inputs_total * layer.outputs_total, 1)
            left += layer.outputs_kept * layer.inputs_kept * per_pair + layer.outputs_kept
            dense += layer.numel + layer.outputs_total
        return float(left), float(dense)

    return count
