"""A sparsity target instead of a strength: ``Regularizer(model, preset, lam, target=...)`` or
``L0Regularizer(..., target=...)``.

``SparsityTarget(kept=0.5, by_step=N)`` asks that a fraction ``kept`` of what ``measure`` counts
be left at step ``N`` and after, in every pool:

* ``measure``: ``"units"`` (groups alive: input units / channels of each weight for the plain
  presets, coupled groups for the coupled presets, open gates for L0), ``"params"`` or
  ``"flops"`` (what the removed groups cost: per group, derived once from the model for the
  coupled presets (``fastprox/target_layers.py``); counted on the compacted model by
  ``fastprox.sparsity_stats`` for the plain presets on ``nn.Sequential`` models);
* pools (what is counted together): by default one pool per kind of structure (``heads``,
  ``neurons``, ``channels`` for the coupled presets; for the plain presets on an
  ``nn.Sequential``, ``features``: the inputs of its first layer, and ``units``: the inputs of
  every later layer; ``gates`` for L0), each reaching ``kept`` on its own; ``per_layer=True``:
  every layer; ``uniform=True``: every layer, and every layer of a kind keeps the same number of
  groups (the same width, what configs with one width per model need); ``by_kind=False``: one
  pool of everything counted. The plain presets' ``params`` / ``flops`` are one pool (a count
  of the compacted model, not a sum per kind);
* ``min_kept``: no layer keeps fewer groups (an int; a float in (0, 1) is a fraction of the
  layer's groups, rounded up); 0 lets a layer be emptied.

The schedule: the part of a pool to remove, ``R = N - round(kept * N)`` (``N`` its units, or
its cost), rises linearly from 0 at ``start`` to ``R`` at ``by_step``; at step ``s`` it allows
``a(s) = round(R * (s - start) / (by_step - start))`` units removed (the cost of them, for
``params`` / ``flops``). The budget, after every proximal step (``Controller.after_step``):

* **spared**: the strongest groups before the step, as many as ``ramp(s) * kept`` of the pool
  (``ramp`` rising from 0 at ``start`` to 1 at ``by_step``; for ``params`` / ``flops``, their
  costs up to that share of what all the pool's groups cost now, which for a count on the
  model, where a group saves less once others are gone, measured better than a share of the
  dense total), get back their values from before the step: the shrinkage falls on the groups
  the target will remove, and less and less on those it keeps. The share grows with the
  schedule, so that the ranking stays open early (every group shrinks while the loss and the
  penalty decide which are strong) and what is kept trains unshrunk by ``by_step``. Not for
  L0 gates, whose copy precedes the optimizer's step (giving it back would undo the update);
* **never ahead**: when the step left more removed than ``a(s)``, the groups that were weakest
  before the step keep their removal, up to ``a(s)``; every
  other group the step zeroed gets back its value from before the step (a copy taken just
  before it, ``Controller.before_step``), and so does a group that would take its layer below
  ``min_kept``;
* **never behind**: when fewer are removed than ``a(s)``, the weakest groups still alive are
  removed, up to ``a(s)``.

Weakest: the smallest norm per ``sqrt(n_g)`` (per 1 without size weighting; an L0 gate's
log_alpha) relative to the mean of its layer's live groups, so that layers of another scale are
ranked on one footing (measured against the raw norm in README.md, "Sparsity targets").

So at every step a pool is within one unit of its schedule (one group's cost, for ``params``
/ ``flops``), at ``by_step`` within one unit of the target, whatever strength it started from.
The strength decides which groups go (the shrinkage ranks them and makes each removal small) and
a dual ascent keeps it where the step itself removes about what the schedule allows, as CoFi and
Sheared-LLaMA do for their L0 masks: every ``every`` steps the fraction the step itself left,
``k`` (before the budget), is compared with the schedule's, ``g``, and the pool's strengths are
scaled by ``exp(rate * (k - g) / (1 - kept))``. At ``by_step`` (with ``hold=True``) the mask is
held (removed groups are reset to zero after every step) and the strengths drop to 0, so that
what is left recovers from the shrinkage. ``controller.reached`` (per pool) is the fraction left
then (with ``hold=False`` too, the budget then going on at the target). A pool the schedule
cannot reach (``min_kept`` in the way; groups that were zero before a
step, which no copy brings back) warns at the step that makes it clear.

In a ``params`` / ``flops`` pool each layer's strength is also weighed by what its groups cost:
its thresholds are set in proportion to ``c / tau`` (``c`` the mean cost of its live groups,
``tau`` their mean norm), the gradient per unit of norm of the pool's cost relaxed as
``sum_g c_g * ||w_g|| / tau`` (the Lagrangian of "the least loss at this cost", as MorphNet's
FLOP regularizer weighs its neurons), normalized to a mean of 1 over the pool's layers. A costly
layer shrinks first; a cheap one (input pixels, each saving one column of the first layer)
keeps its groups. In a units pool (every group costs 1) it was measured to change nothing, and
is not applied (bench/RESULTS.md, "a cost pool's strengths weighed by cost").

The copy costs one read and one write of the controlled weights per step until ``by_step``
(and memory for one copy); the groups' norms one read (the cost shares take them from there),
the copy's norms one more (for the spared share and the budget), and giving the spared share
back one write of it (bench/RESULTS.md, "the kept share spared").
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

MEASURES = ("units", "params", "flops")


@dataclasses.dataclass
class SparsityTarget:
    """What to reach and when (see the module docstring)."""

    kept: float
    by_step: int
    measure: str = "units"
    per_layer: bool = False
    by_kind: bool = True
    uniform: bool = False
    min_kept: int | float = 1
    layers: tuple | None = None  # names of the targets (or L0 gates' layers) counted; None: all
    start: int = 0
    every: int = 1  # steps between two updates of the strengths
    rate: float = 0.1
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
        for name in ("per_layer", "by_kind", "uniform", "hold"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {getattr(self, name)!r}")
        m = self.min_kept
        if isinstance(m, bool) or not (isinstance(m, int) and m >= 0 or
                                       isinstance(m, float) and 0 < m < 1):
            raise ValueError(f"{fn}: min_kept must be an int >= 0 (groups per layer) or a "
                             f"fraction in (0, 1), got {m!r}")
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def ramp(self, step: int) -> float:
        """The part of the removal the schedule allows at ``step``: 0 at start, 1 at by_step."""
        return min(max((step - self.start) / (self.by_step - self.start), 0.0), 1.0)

    def floor(self, groups: int) -> int:
        """The fewest groups ``min_kept`` leaves in a layer of ``groups``."""
        m = self.min_kept
        return min(groups, m if isinstance(m, int) else math.ceil(m * groups - 1e-9))


@dataclasses.dataclass
class Layer:
    """One controlled layer, as the controller sees it.

    ``measure() -> (alive, scores)``: per group, on the CPU, whether it is alive and its
    strength (smaller goes first: norm per sqrt(n_g), or an L0 gate's log_alpha);
    ``remove(mask)`` zeroes the groups of a bool mask; ``scale(s)`` sets its strengths to ``s``
    times their base; ``save()`` copies its tensors (the state before a step), ``restore(state,
    mask)`` puts back the groups of ``mask`` from such a copy, ``saved(state)`` measures a copy.
    ``kind`` names its pool by default; ``costs`` (float64, per group, or a callable giving them)
    is what a group's removal saves for ``params`` / ``flops`` (None: 1 per group);
    ``storages``: the data pointers of the tensors it writes (two layers that share one, a conv
    in two channel sets, are kept consistent after a restore); ``weight_sq``: the mean over its
    groups of the square of a group's factor in its threshold (``n_g`` size-weighted, else 1;
    a score, a norm per factor, times it is a norm per unit of threshold, which the cost shares
    of a params / FLOPs pool divide by)."""

    name: str
    kind: str
    size: int
    measure: object
    remove: object
    scale: object
    save: object
    restore: object
    saved: object
    costs: object = None
    storages: tuple = ()
    weight_sq: float = 1.0

    def cost(self) -> torch.Tensor:
        if self.costs is None:
            return torch.ones(self.size, dtype=torch.float64)
        return self.costs() if callable(self.costs) else self.costs


@dataclasses.dataclass
class Pool:
    """Layers counted together: ``members`` (indices into the controller's layers), ``total``
    (units or cost), ``remove`` (what the target removes: ``R``)."""

    name: str
    members: list
    total: float
    remove: float
    units: bool


@dataclasses.dataclass
class PoolStats:
    """What a pool has left (``left`` of ``total``: units, params or FLOPs), the fraction,
    what the schedule asks at this step (``goal``) and at ``by_step`` (``kept``)."""

    name: str
    measure: str
    left: float
    total: float
    fraction: float
    goal: float
    kept: float

    def row(self) -> str:
        return (f"| {self.name} | {self.measure} | {self.left:g}/{self.total:g} | "
                f"{100 * self.fraction:.1f} % | {100 * self.goal:.1f} % | "
                f"{100 * self.kept:.1f} % |")


POOL_HEADER = ("| pool | counts | left | fraction | schedule now | target |\n"
               "|---|---|---|---|---|---|")


class Controller:
    """Drives a regularizer toward a ``SparsityTarget`` (module docstring): the budget after
    every step and the strengths' dual ascent.

    ``layers``: ``Layer`` per controlled layer (built by the regularizer). ``count`` (optional):
    ``count(measure) -> (left, dense)``, the exact params / FLOPs of the compacted model, which
    then decides the pool's removal (one pool), the layers' ``costs`` giving each group's share.
    ``spare``: the strongest share gets its values from before the step back (module
    docstring, "spared"; the copy must be of the state the proximal step started from). The
    regularizer calls ``before_step()`` before its proximal step and ``after_step()``
    after it."""

    def __init__(self, target: SparsityTarget, layers: list[Layer], count=None, overlaps=(),
                 spare: bool = False):
        if not layers:
            raise ValueError("SparsityTarget: nothing to control (no regularized layer matches)")
        self.target, self.layers, self.count = target, layers, count
        self.spare = spare
        self.overlaps = list(overlaps)
        # per layer, the other layers that write one of its tensors
        self._sharing = [{j for j, other in enumerate(layers)
                          if j != i and set(layer.storages) & set(other.storages)}
                         for i, layer in enumerate(layers)]
        self.pools = self._pools()
        self.log_scale = [0.0] * len(self.pools)
        self.steps = 0
        self.held: list[torch.Tensor] | None = None
        self.reached: dict[str, float] | None = None
        self.history: list[tuple[int, float]] = []
        self.warned: list[str] = []
        self._saved = None
        self._check_floors()

    # -- pools -----------------------------------------------------------------------------------
    def _pools(self) -> list[Pool]:
        t, layers = self.target, self.layers
        units = t.measure == "units"
        if self.count is not None:
            groups = [("all", list(range(len(layers))))]
        elif t.per_layer or t.uniform:
            groups = [(layer.name, [i]) for i, layer in enumerate(layers)]
        elif t.by_kind:
            kinds: dict[str, list[int]] = {}
            for i, layer in enumerate(layers):
                kinds.setdefault(layer.kind, []).append(i)
            groups = list(kinds.items())
        else:
            groups = [("all", list(range(len(layers))))]
        if t.uniform:
            widths: dict[str, dict[str, int]] = {}
            for layer in layers:
                widths.setdefault(layer.kind, {})[layer.name] = layer.size
            for kind, sizes in widths.items():
                if len(set(sizes.values())) > 1:
                    raise ValueError(f"SparsityTarget: uniform=True keeps the same width in "
                                     f"every layer of a kind, but the {kind} layers have "
                                     f"different widths: {sizes}")
        pools = []
        for name, members in groups:
            if self.count is not None:
                left, dense = self.count(t.measure)
                total = float(dense)
            else:
                total = float(sum(float(layers[i].cost().sum()) for i in members))
                total -= sum(pair * float(wi.sum()) * float(wj.sum())
                             for i, j, wi, wj, pair in self.overlaps
                             if i in members and j in members)
            remove = total - math.floor(t.kept * total + 0.5) if units else (1 - t.kept) * total
            pools.append(Pool(name, members, total, float(remove), units))
        return pools

    def _check_floors(self) -> None:
        for pool in self.pools:
            if not pool.units:
                continue
            floors = sum(self.target.floor(self.layers[i].size) for i in pool.members)
            if pool.total - pool.remove < floors:
                self._warn(pool, f"min_kept={self.target.min_kept!r} keeps at least {floors} of "
                                 f"{int(pool.total)} groups, more than the "
                                 f"{int(pool.total - pool.remove)} asked; the pool stops there")

    def _warn(self, pool: Pool, text: str) -> None:
        message = f"SparsityTarget: pool {pool.name!r}: {text}"
        if message not in self.warned:
            self.warned.append(message)
            warnings.warn(message, stacklevel=3)

    def allowed(self, pool: Pool, step: int) -> float:
        """What the schedule lets the pool have removed at ``step``."""
        a = pool.remove * self.target.ramp(step)
        return float(math.floor(a + 0.5)) if pool.units else a

    # -- measuring -------------------------------------------------------------------------------
    def _removed(self, pool: Pool, alive: list, costs: list) -> float:
        if self.count is not None:
            left, dense = self.count(self.target.measure)
            return float(dense - left)
        removed = float(sum(float(costs[i][~alive[i]].sum()) for i in pool.members))
        for i, j, wi, wj, pair in self.overlaps:  # elements two layers of the pool both count
            if i in pool.members and j in pool.members:
                removed -= pair * float(wi[~alive[i]].sum()) * float(wj[~alive[j]].sum())
        return removed

    def fractions(self, alive=None, costs=None) -> dict[str, float]:
        """What is left, per pool."""
        alive = alive or [layer.measure()[0] for layer in self.layers]
        costs = costs or [layer.cost() for layer in self.layers]
        return {p.name: (p.total - self._removed(p, alive, costs)) / p.total if p.total else 1.0
                for p in self.pools}

    def report(self) -> list[PoolStats]:
        """Every pool, now (``fastprox.sparsity_stats`` and ``coupled_stats`` show them)."""
        fractions = self.fractions()
        out = []
        for p in self.pools:
            goal = (p.total - self.allowed(p, self.steps)) / p.total if p.total else 1.0
            kept = (p.total - p.remove) / p.total if p.total else 1.0
            out.append(PoolStats(p.name, self.target.measure, fractions[p.name] * p.total,
                                 p.total, fractions[p.name], goal, kept))
        return out

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Copies the controlled tensors, for the budget after the step (until by_step)."""
        if self.held is None:
            self._saved = [layer.save() for layer in self.layers]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        t = self.target
        if self.held is not None:
            for layer, mask in zip(self.layers, self.held):
                layer.remove(~mask)
            self._saved = None
            return
        costs = [layer.cost() for layer in self.layers]
        before = {}  # per layer, (alive, scores) of the copy, measured once
        restored = self._spare(before, costs) if self.spare and self._saved is not None \
            else set()
        if restored and any(self._counted(p) for p in self.pools):  # what a group saves moved
            costs = [layer.cost() for layer in self.layers]
        measured = [layer.measure() for layer in self.layers]
        alive = [a.clone() for a, _ in measured]
        scores = [s for _, s in measured]
        natural = [self._removed(p, alive, costs) for p in self.pools]
        for p in self.pools:
            restored |= self._budget(p, alive, scores, costs, before)
        # a restored slice of a tensor another layer also holds (a conv in two sets) may have
        # brought back elements of that layer's removed groups: they are zeroed again
        for i in set().union(*(self._sharing[k] for k in restored)):
            self.layers[i].remove(~alive[i])
        self._saved = None
        if self.steps % t.every == 0:
            span = max(1.0 - t.kept, 1e-3)
            for i, p in enumerate(self.pools):
                k = 1.0 - natural[i] / p.total if p.total else 1.0
                goal = 1.0 - self.allowed(p, self.steps) / p.total if p.total else 1.0
                self.log_scale[i] = min(max(self.log_scale[i] + t.rate * (k - goal) / span,
                                            -30.0), 30.0)
        costs = [layer.cost() for layer in self.layers]
        fractions = self.fractions(alive, costs)
        self.history.append((self.steps, sum(fractions.values()) / len(fractions)))
        if self.steps >= t.by_step and self.reached is None:  # what by_step reached
            self.reached = fractions
            for p in self.pools:
                left = fractions[p.name] * p.total
                if abs(left - (p.total - p.remove)) > self._unit(p, costs) + 1e-9:
                    self._warn(p, f"reached {fractions[p.name]:.4f} at step {self.steps}, not "
                                  f"{t.kept}")
        if t.hold and self.steps >= t.by_step:
            self.held = [a.clone() for a in alive]
        self._apply(alive, scores, costs)

    def _counted(self, pool: Pool) -> bool:
        """Whether what a group saves depends on the others: the pool is counted on the
        model, or two of its layers count some elements both."""
        return self.count is not None or any(i in pool.members and j in pool.members
                                             for i, j, *_ in self.overlaps)

    def _unit(self, pool: Pool, costs: list) -> float:
        """One unit of the pool: 1, or its costliest group."""
        if pool.units:
            return 1.0
        return max((float(costs[i].max()) for i in pool.members if self.layers[i].size),
                   default=0.0)

    def _copy(self, before: dict, i: int):
        """Layer ``i``'s copy (the state before the step), measured once a step."""
        if i not in before:
            before[i] = self.layers[i].saved(self._saved[i])
        return before[i]

    def _spare(self, before: dict, costs: list) -> set:
        """Gives back their values from before the step to the strongest groups of each pool
        (module docstring, "spared"): ranked by relative score before the step, until their
        cost reaches ``ramp * kept`` of what the pool's groups cost now. The layers written."""
        layers = self.layers
        share = self.target.ramp(self.steps) * self.target.kept
        if share <= 0:
            return set()
        back = {}
        for pool in self.pools:
            ranked, owner, cost, total = [], [], [], 0.0
            for i in pool.members:
                was, score = self._copy(before, i)
                live = torch.nonzero(was).flatten()
                ranked.append(_relative(score, was)[live])
                owner.append(torch.stack([torch.full_like(live, i), live], dim=1))
                cost.append(costs[i][live])
                total += float(costs[i].sum())
            ranked, owner, cost = torch.cat(ranked), torch.cat(owner), torch.cat(cost)
            order = torch.argsort(ranked, descending=True, stable=True)
            # the strongest first, while their cost fits in the share
            count = int((torch.cumsum(cost[order], 0) <= share * total + 1e-9).sum())
            for i, g in owner[order[:count]].tolist():
                back.setdefault(i, []).append(g)
        # a layer that shares a tensor with a spared one (a conv in two channel sets) keeps
        # the removals of the step: the spared slice brought back some of its elements
        # (its own spared groups aside)
        sharing = set().union(*(self._sharing[i] for i in back)) if back else set()
        removed = {j: ~layers[j].measure()[0] for j in sharing}
        for i, groups in back.items():
            mask = torch.zeros(layers[i].size, dtype=torch.bool)
            mask[groups] = True
            layers[i].restore(self._saved[i], mask)
            if i in removed:
                removed[i] &= ~mask
        for j, mask in removed.items():
            if bool(mask.any()):
                layers[j].remove(mask)
        return set(back)

    def _budget(self, pool: Pool, alive: list, scores: list, costs: list,
                before: dict) -> set:
        """Brings the pool's removal to the schedule (module docstring); the layers whose
        groups were restored from the copy."""
        layers = self.layers
        allowed = self.allowed(pool, self.steps)
        removed = self._removed(pool, alive, costs)
        floors = {i: self.target.floor(layers[i].size) for i in pool.members}
        below = any(int(alive[i].sum()) < floors[i] for i in pool.members)
        restored = set()
        if (removed > allowed + 1e-9 or below) and self._saved is not None:
            # a group given back to keep its layer at min_kept may leave the pool behind the
            # schedule: the weakest others make it up below (the given back scored as restored)
            restored = self._restore(pool, alive, scores, costs, allowed, floors, before)
            if self._counted(pool):
                costs[:] = [layer.cost() for layer in layers]
            removed = self._removed(pool, alive, costs)
        for _ in range(8 if self._counted(pool) else 1):
            if removed >= allowed - 1e-9 or not self._force(pool, alive, scores, costs,
                                                            allowed - removed, floors):
                break
            # each removal changed what the others save (a count, overlaps): count again
            costs[:] = [layer.cost() for layer in layers]
            removed = self._removed(pool, alive, costs)
        return restored

    def _restore(self, pool, alive, scores, costs, allowed, floors, before) -> set:
        layers = self.layers
        # the groups the step removed, weakest before the step first (the copy is measured
        # only where the step left a group removed); those already zero before it have no
        # value to go back to
        candidates = []
        for i in pool.members:
            if not bool((~alive[i]).any()):
                continue
            was, copied = self._copy(before, i)
            score = _relative(copied, was)
            dead = torch.nonzero(~alive[i]).flatten()
            candidates += zip(was[dead].tolist(), score[dead].tolist(), [i] * len(dead),
                              dead.tolist(), costs[i][dead].tolist())
        candidates.sort()
        if self.count is None:
            removed = 0.0  # with overlaps, an over-estimate: the loop after it fills the rest
        else:  # exact count: the removed left as they are, less what is restored
            removed = self._removed(pool, alive, costs)
            removed -= sum(c for was, _, i, g, c in candidates if was)
        dead = {i: 0 for i in pool.members}
        back = {i: [] for i in pool.members}
        stuck = 0
        for was, _, i, g, c in candidates:
            if not was:
                removed += c if self.count is None else 0.0
                dead[i] += 1
                stuck += 1
            elif removed + c <= allowed + 1e-9 and layers[i].size - dead[i] - 1 >= floors[i]:
                removed += c
                dead[i] += 1
            else:
                back[i].append(g)
        for i, groups in back.items():
            if groups:
                mask = torch.zeros(layers[i].size, dtype=torch.bool)
                mask[groups] = True
                layers[i].restore(self._saved[i], mask)
                alive[i] |= mask
                scores[i] = torch.where(mask, before[i][1], scores[i])
        if removed > allowed + self._unit(pool, costs) + 1e-9 and stuck:
            self._warn(pool, f"{stuck} groups were zero before the proximal step of step "
                             f"{self.steps} (the optimizer left them there): ahead of the "
                             "schedule, and no copy brings them back")
        return {i for i, groups in back.items() if groups}

    def _force(self, pool, alive, scores, costs, room, floors) -> bool:
        layers = self.layers
        candidates = []
        for i in pool.members:
            score = _relative(scores[i], alive[i])
            live = torch.nonzero(alive[i]).flatten()
            candidates += zip(score[live].tolist(), [i] * len(live), live.tolist(),
                              costs[i][live].tolist())
        candidates.sort()
        left = {i: int(alive[i].sum()) for i in pool.members}
        drop = {i: [] for i in pool.members}
        for _, i, g, c in candidates:
            if c <= room + 1e-9 and left[i] - 1 >= floors[i]:
                room -= c
                left[i] -= 1
                drop[i].append(g)
            if room < 1e-9:
                break
        for i, groups in drop.items():
            if groups:
                mask = torch.zeros(layers[i].size, dtype=torch.bool)
                mask[groups] = True
                layers[i].remove(mask)
                alive[i] &= ~mask
        return any(drop.values())

    def _apply(self, alive=None, scores=None, costs=None) -> None:
        """Every layer's strength: its pool's scale (0 once held), in a params / FLOPs pool
        times the layer's cost share (``_shares``, from the step's ``alive`` / ``scores`` /
        ``costs`` per layer; measured when not given)."""
        for i, pool in enumerate(self.pools):
            shares = {} if self.held is not None or pool.units else \
                self._shares(pool, alive, scores, costs)
            for k in pool.members:
                self.layers[k].scale(0.0 if self.held is not None
                                     else math.exp(self.log_scale[i]) * shares.get(k, 1.0))

    def _shares(self, pool: Pool, alive=None, scores=None, costs=None) -> dict[int, float]:
        """Per layer of a cost pool, ``c / tau`` over the pool's mean (module docstring):
        ``c`` the mean cost of its live groups, ``tau`` their mean norm per unit of threshold
        (the mean score times ``weight_sq``). A layer with no live group, or live groups of
        norm 0, keeps 1."""
        raw = {}
        for k in pool.members:
            layer = self.layers[k]
            live, score = layer.measure() if alive is None else (alive[k], scores[k])
            if not bool(live.any()):
                continue
            tau = float(score[live].mean()) * layer.weight_sq
            cost = float((layer.cost() if costs is None else costs[k])[live].mean())
            if tau > 0 and math.isfinite(tau) and cost > 0:
                raw[k] = cost / tau
        if not raw:
            return {}
        mean = sum(raw.values()) / len(raw)
        return {k: v / mean for k, v in raw.items()}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"target": dataclasses.asdict(self.target) | {"example_input": None},
                "log_scale": list(self.log_scale), "steps": self.steps,
                "held": None if self.held is None else [m.clone() for m in self.held],
                "reached": None if self.reached is None else dict(self.reached),
                "history": list(self.history)}

    def load_state_dict(self, state) -> None:
        """Restores what ``state_dict`` saved, after checking all of it (``check_state``):
        a state that does not fit this controller changes nothing."""
        self.set_state(self.check_state(state))

    def set_state(self, checked: tuple) -> None:
        """Takes a state ``check_state`` returned."""
        self.log_scale, self.steps, self.held, self.reached, self.history = checked
        self._saved = None
        self._apply()

    def check_state(self, state, fn: str = "SparsityTarget.load_state_dict") -> tuple:
        """The values of a saved state, checked against this controller (its layers' group
        counts, the target's measure, pools and layers), as (log_scale, steps, held, reached,
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
            for key in ("measure", "per_layer", "by_kind", "uniform", "layers"):
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
                             f"numbers (one per pool: {[p.name for p in self.pools]}), got "
                             f"{log_scale!r}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
        held = self._masks(state["held"], "held", fn)
        reached = state["reached"]
        names = {p.name for p in self.pools}
        if not (reached is None or isinstance(reached, dict) and set(reached) == names
                and all(_finite_number(v) for v in reached.values())):
            raise ValueError(f"{fn}: reached must be None or a number per pool "
                             f"({sorted(names)}), got {reached!r}")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and _finite_number(h[0])
                and _finite_number(h[1]) for h in history):
            raise ValueError(f"{fn}: history must be a list of (step, fraction) pairs")
        return (list(log_scale), steps, held, None if reached is None else dict(reached),
                [tuple(h) for h in history])

    def _masks(self, masks, key: str, fn: str):
        """None, or one bool mask per controlled layer (one entry per group), copied."""
        if masks is None:
            return None
        if not isinstance(masks, (list, tuple)) or len(masks) != len(self.layers):
            count = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
            raise ValueError(f"{fn}: {key} must be None or one mask per controlled layer "
                             f"({len(self.layers)}), got {count}")
        checked = []
        for layer, mask in zip(self.layers, masks):
            shape = (layer.size,)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                    or tuple(mask.shape) != shape:
                got = (f"{mask.dtype} of shape {tuple(mask.shape)}"
                       if isinstance(mask, torch.Tensor) else type(mask).__name__)
                raise ValueError(f"{fn}: the {key} mask of {layer.name} must be a bool tensor "
                                 f"of shape {shape} (one entry per group), got {got}: a state "
                                 "from a model of another width?")
            checked.append(mask.detach().to("cpu").clone())
        return checked


def _relative(score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Scores relative to the mean of the layer's live groups: layers of another scale (an input
    layer of small columns, a wide hidden layer) are ranked on one footing."""
    if not bool(alive.any()):
        return score
    mean = float(score[alive].mean())
    return score / mean if mean > 0 else score


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)
