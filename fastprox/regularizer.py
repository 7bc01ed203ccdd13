"""Structured-sparsity regularizers on a model: which tensors, which groups, which lam.

A ``Regularizer`` holds one ``Target`` per regularized tensor. Each target's penalty is

    Omega(W) = lam_l1 * ||W||_1 + lam_group * sum_g c ||W_g||_2 + (lam_exclusive / 2) * sum_g ||W_g||_1^2

(``c = sqrt(n)`` when ``size_weighted``, else 1; groups as ``dim`` in fastprox.ops), used two ways:

* proximal: ``reg.attach(optimizer)`` applies, after every ``optimizer.step()``, the proximal
  step with thresholds ``lr * lam`` (``lr`` of the parameter's group at that step, so LR schedulers
  are followed), for all targets in one ``fastprox.foreach_prox_`` call per device;
* penalty: ``loss = loss + reg.penalty()``, differentiable, with a finite (zero) gradient at a
  zero group.

Presets follow the seed methods (docs/SPEC.md): ``group_lasso`` / ``sparse_group_lasso``
(Scardapane et al. 2017), ``lasso``, ``exclusive``, ``cges`` (Yoon & Hwang 2017), each on the
input units of every Linear, conv, Hugging Face ``Conv1D`` and packed attention projection
(``nn.MultiheadAttention.in_proj_weight``). The coupled presets ``channels``, ``neurons`` and
``heads`` (fastprox/groups.py) regularize what a model can lose as a whole: group lasso on
coupled groups (``CoupledTarget``), whose units ``fastprox.compact`` then removes. Every
parameter a preset leaves out is listed in ``reg.skipped`` with the reason.

Here: the Regularizer (its targets, the optimizer hook, its penalty, its state). What a preset
makes of a model is fastprox/presets.py; the proximal step itself, Euclidean or in an Adam
step's metric, is fastprox/steps.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import torch
from torch import nn

from . import _checks, ops, presets as _presets, steps as _steps, target as _target
from . import target_layers as _layers
from ._modules import WEIGHTED as _WEIGHTED
from ._checks import is_dtensor
from .presets import COUPLED_PRESETS, PRESETS, CGESSchedule, CoupledTarget, Target
from .steps import PROX_MODES

__all__ = ["Regularizer", "Target", "CoupledTarget", "CGESSchedule", "PRESETS",
           "COUPLED_PRESETS", "PROX_MODES"]


class Regularizer:
    """Structured-sparsity regularizer of a model's Linear and conv weights.

    Args:
        model: an ``nn.Module`` (its Linear, Conv1d/2d/3d, Hugging Face Conv1D weights and
            packed attention projections are regularized), or an iterable of
            ``(name, parameter)`` pairs (2-D tensors are treated as Linear weights, 3-D and more
            as conv weights; 1-D ones are left out).
        preset: ``"group_lasso"``, ``"sparse_group_lasso"``, ``"lasso"``, ``"exclusive"`` or
            ``"cges"``; a coupled preset ``"channels"``, ``"neurons"``, ``"heads"`` or a tuple of
            them (group lasso, lam_group = lam, on the coupled groups of fastprox.groups; an
            ``nn.Module`` only); or None to start empty and ``add`` targets by hand.
        lam: the preset's strength. ``group_lasso``: lam_group = lam (size-weighted, Scardapane);
            ``sparse_group_lasso``: lam_group = lam and lam_l1 = ``lam_l1`` (default: lam);
            ``lasso``: lam_l1 = lam; ``exclusive``: lam_exclusive = lam (exact prox);
            ``cges``: per layer from ``schedule`` (not size-weighted, CGES's threshold bound,
            as published; ``exact=True`` in ``overrides`` gives the exact prox).
        exclude: module or parameter names to leave out (e.g. the last layer).
        overrides: ``{module or parameter name: {setting: value}}``; a module name applies to
            all its regularized parameters. ``kind`` (a preset name) and ``lam`` rebuild the
            target as that preset with that strength; then any field of ``Target``
            (``lam_l1``, ``lam_group``, ``lam_exclusive``, ``dim``, ``size_weighted``,
            ``exact``) is set as given.
        bias_l1: lam of an L1 penalty on the biases of the regularized layers (default: biases
            are left out, as in the seeds' code).
        schedule: ``CGESSchedule`` for the ``cges`` preset.
        example_inputs, forward_fn: what the model is called with, for the ``channels``
            preset's trace (``fastprox.groups.channels``).

    With a coupled preset, an ``overrides`` key is a kind (``"heads"``: every set of it), a
    set's name, or its module's or a member's name, and sets ``lam_l1``, ``lam_group``,
    ``lam_exclusive``, ``size_weighted`` or ``exact`` of the ``CoupledTarget``.

    Everything is checked here, not at the first step: unknown names in ``exclude`` and
    ``overrides``, a ``dim`` that does not fit its tensor, thresholds (numbers, numpy scalars
    included). ``reg.skipped`` lists every parameter left out, with the reason.

    Example::

        reg = fastprox.Regularizer(model, "group_lasso", lam=1e-3)
        reg.attach(optimizer)            # proximal step after every optimizer.step()
        # or: loss = loss + reg.penalty()
    """

    def __init__(self, model, preset: str | None = "group_lasso", lam: float = 1e-3, *,
                 lam_l1: float | None = None, exclude: Iterable[str] = (),
                 overrides: Mapping[str, Mapping] | None = None, bias_l1: float | None = None,
                 schedule: CGESSchedule | None = None, example_inputs=None, forward_fn=None,
                 target: _target.SparsityTarget | None = None):
        coupled = _presets.coupled_kinds(preset)
        if preset is not None and preset not in PRESETS and not coupled:
            raise ValueError(f"Regularizer: preset must be one of {PRESETS}, one of "
                             f"{COUPLED_PRESETS} (or a tuple of them) or None, got {preset!r}")
        lam = _presets.check_lam(lam, "lam")
        lam_l1 = lam if lam_l1 is None else _presets.check_lam(lam_l1, "lam_l1")
        self.targets: dict[str, Target] = {}
        self.coupled: dict[str, CoupledTarget] = {}
        self.skipped: list[tuple[str, str]] = []
        self.found = None  # the coupled presets' discovery (fastprox.groups.Found)
        self.steps = 0
        self.prox = "auto"  # which proximal step prox_step takes (see attach)
        self.controller: _target.Controller | None = None
        self._metric_plan = None  # the metric step, planned (fastprox/metric_plan.py)
        self._euclidean_plan = None  # the Euclidean step's (fastprox/euclidean_plan.py)
        if target is not None and not isinstance(target, _target.SparsityTarget):
            raise TypeError(f"Regularizer: target must be a fastprox.SparsityTarget, got "
                            f"{type(target).__name__}")
        if preset is None:
            if target is not None:
                raise ValueError("Regularizer: a target needs a preset (its layers)")
            return
        self._build(model, preset, coupled, lam, lam_l1, exclude, overrides, bias_l1, schedule,
                    example_inputs, forward_fn)
        if target is not None:
            self.controller = self._controller(model, target)

    def _build(self, model, preset, coupled, lam, lam_l1, exclude, overrides, bias_l1, schedule,
               example_inputs, forward_fn) -> None:
        if isinstance(exclude, str):
            exclude = (exclude,)
        exclude = set(exclude)
        _presets.check_names(model, exclude, "exclude")
        if coupled:
            self.coupled, self.found, self.skipped = _presets.coupled_targets(
                model, coupled, lam, exclude, overrides, example_inputs, forward_fn)
        else:
            self.targets, self.skipped = _presets.plain_targets(
                model, preset, lam, lam_l1, exclude, overrides, bias_l1,
                schedule or CGESSchedule())

    def _controller(self, model, target: _target.SparsityTarget) -> _target.Controller:
        every = {**self.targets, **self.coupled}
        # default: every weight's groups (1-D targets, L1 on biases, have no units)
        names = [n for n, t in every.items() if not isinstance(t, Target) or t.param.dim() > 1] \
            if target.layers is None else list(target.layers)
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ValueError(f"Regularizer: target.layers names no regularized tensor or coupled "
                             f"set: {unknown} (they are: {sorted(every)})")
        plain = [n for n in names if isinstance(every[n], Target)]
        count = costs = None
        if target.measure != "units" and plain:
            if self.coupled or not isinstance(model, nn.Sequential):
                raise ValueError(f"SparsityTarget: measure {target.measure!r} on plain targets "
                                 "is counted on the compacted model by fastprox.sparsity_stats, "
                                 "which serves nn.Sequential models; use measure='units' or a "
                                 "coupled preset")
            if target.per_layer or target.uniform:
                raise ValueError(f"SparsityTarget: measure {target.measure!r} on plain targets "
                                 f"is one pool: the {target.measure} of the compacted model, "
                                 "which is not a sum over layers; per_layer and uniform count "
                                 "units")
            from .stats import sparsity_stats

            count, costs = _layers.sequential_counts(model, target.example_input,
                                                     sparsity_stats, target.measure)
        coupled_names = [n for n in names if n not in plain]
        coupled = [every[n] for n in coupled_names]
        coupled_costs, overlaps = {}, []
        if target.measure != "units" and coupled:
            inputs = target.example_input
            found = self.found
            if inputs is None and found is not None:
                inputs = found.example_inputs
            values, crossing = _layers.coupled_costs(
                coupled, model, target.measure, inputs,
                found.forward_fn if found is not None else None)
            coupled_costs = dict(zip(coupled_names, values))
            at = {k: names.index(n) for k, n in enumerate(coupled_names)}
            overlaps = [(at[i], at[j], wi, wj, pair) for i, j, wi, wj, pair in crossing]
        first = next((f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, _WEIGHTED)), None) if isinstance(model, nn.Sequential) \
            else None
        layers = []
        for name in names:
            t = every[name]
            if isinstance(t, CoupledTarget):
                layers.append(_layers.coupled_layer(t, coupled_costs.get(name)))
            else:
                dims = _checks.normalize_dim(t.dim, t.param, "Regularizer")
                # the first layer's inputs are the model's features; its rows are units
                kind = "features" if name == first and 1 not in dims else "units"
                size = math.prod(s for d, s in enumerate(t.param.shape) if d not in dims)
                layers.append(_layers.plain_layer(t, dims, kind, None if costs is None
                                                  else costs(name, size)))
        return _target.Controller(target, layers, count, overlaps, spare=True)

    # -- building ------------------------------------------------------------------------------
    def add(self, name: str, param: torch.Tensor, *, kind: str = "custom", lam_l1: float = 0.0,
            lam_group: float = 0.0, lam_exclusive: float = 0.0, dim=None,
            size_weighted: bool = True, exact: bool = True) -> Target:
        """Adds (or replaces) the target of one tensor, with explicit thresholds and groups.
        A tensor that shares memory with another target (the same parameter under another
        name, a view of it) is refused: one tensor has one target, whose thresholds can combine
        L1, group and exclusive terms."""
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"Regularizer.add: param must be a tensor, got {type(param).__name__}")
        check = _presets.check_lam
        target = Target(name, param, kind, check(lam_l1, "lam_l1"), check(lam_group, "lam_group"),
                        check(lam_exclusive, "lam_exclusive"), dim, size_weighted, exact)
        _presets.check_dim(target)
        for other in self.targets.values():
            if other.name != name and _checks.shares_memory(other.param, param):
                raise ValueError(
                    f"Regularizer.add: {name} shares memory with the target {other.name} (the "
                    "same tensor or a view of it); a tensor takes one target: give all its "
                    f"thresholds in one call, or replace {other.name} with add({other.name!r}, "
                    "...)")
        self.targets[name] = target
        return target

    def __len__(self) -> int:
        return len(self.targets) + len(self.coupled)

    def __repr__(self) -> str:
        lines = [f"  {t.name}: {t.kind} lam_l1={t.lam_l1:g} lam_group={t.lam_group:g} "
                 f"lam_exclusive={t.lam_exclusive:g} dim={t.dim}" for t in self.targets.values()]
        lines += [f"  {t.name}: {t.groups.num_groups} coupled groups lam_group={t.lam_group:g}"
                  for t in self.coupled.values()]
        return "Regularizer(\n" + "\n".join(lines) + "\n)"

    # -- proximal ------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer, *, prox: str = "auto"):
        """Applies ``prox_step(optimizer)`` after every ``optimizer.step()`` (a step post-hook).

        ``prox`` chooses the proximal step (kept in ``reg.prox`` and in ``state_dict``):

        * ``"auto"`` (default): the step in the optimizer's metric for ``torch.optim.Adam`` and
          ``AdamW`` (any betas, eps, weight decay, amsgrad, foreach / fused, tensor lr, LR
          schedulers: ``fastprox.foreach_metric_prox_`` with the optimizer's state), the
          Euclidean step (thresholds ``lr * lam``) for ``torch.optim.SGD``; any other optimizer
          raises ValueError: its step has no proximal step fastprox computes exactly;
        * ``"metric"``: the metric step (Adam / AdamW only);
        * ``"euclidean"``: the Euclidean step, thresholds ``lr * lam``, with any optimizer (for
          Adam and others a heuristic: the thresholds ignore the step's per-element scaling).

        Returns the hook's handle; ``handle.remove()`` detaches. Every target must be a
        parameter of the optimizer."""
        _steps.prox_of(optimizer, prox, "Regularizer.attach")
        _steps.lr_of(self, optimizer)  # fails now, not at the first step, if a target is missing
        self.prox = prox
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.prox_step(opt))

    @torch.no_grad()
    def prox_step(self, optimizer: torch.optim.Optimizer | None = None, *, lr=None,
                  prox: str | None = None) -> None:
        """The proximal step of every target (fastprox/steps.py).

        With an Adam / AdamW ``optimizer`` and ``prox`` (default: ``reg.prox``, set by
        ``attach``) "auto" or "metric": the step in the optimizer's metric (see ``attach``),
        thresholds ``lam``; a parameter the optimizer has not stepped yet (no state) is left
        as it is. Otherwise the Euclidean step, thresholds ``lr * lam``: ``lr`` is the
        parameter group's current lr of ``optimizer``, or the ``lr`` given (a number or a 0-d
        tensor). All targets on one device go through one ``foreach_prox_``
        call (the dispatcher picks the device's kernel: fused on the CPU and on CUDA with
        Triton, the C++ kernels on a host copy elsewhere). Sharded targets (DTensor parameters,
        as under FSDP2's ``fully_shard``) go through a call of their own, which
        ``foreach_prox_`` hands to ``fastprox.distributed``: every rank must take the step.

        Under ``torch.compile`` (a whole training step compiled, the step attached to its
        optimizer): the Euclidean step (plain targets; coupled sets with learning rates that
        are numbers, from their second step on) is traced into the graph, no break; the metric
        step, a target and the other coupled steps work on the host (the optimizer's step
        counts, the groups' ranking) and run outside the graph, as one region: one graph
        break (fastprox/steps.py, ``take``)."""
        if (optimizer is None) == (lr is None):
            raise ValueError("Regularizer.prox_step: give an optimizer or an lr, not both")
        metric = optimizer is not None and _steps.prox_of(
            optimizer, prox or self.prox, "Regularizer.prox_step") == "metric"
        _steps.take(self, optimizer, lr, metric)

    # -- penalty -------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """The sum of every target's Omega(W), differentiable (group norms by the fused kernel;
        the gradient at a zero group is 0, never NaN). With DTensor parameters it is computed
        with DTensor's own operations (collective: every rank must call it)."""
        total = None
        for t in self.targets.values():
            term = _penalty(t)
            if term is not None:
                total = term if total is None else total + term
        for t in self.coupled.values():
            term = t.groups.penalty(lam_l1=t.lam_l1, lam_group=t.lam_group,
                                    lam_exclusive=t.lam_exclusive, size_weighted=t.size_weighted)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Thresholds and groups of every target (by name), the proximal step chosen (``prox``),
        the count of proximal steps and, with a target, its controller's state."""
        state = {"steps": self.steps, "prox": self.prox,
                 "targets": {name: t.config() for name, t in self.targets.items()}}
        if self.coupled:
            state["coupled"] = {name: t.config() for name, t in self.coupled.items()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restores what ``state_dict`` saved. Everything is checked first (target and set
        names, each setting, ``dim`` against its tensor, the step count, ``prox``, the
        controller's state against its layers); a state that does not fit changes nothing."""
        fn = "Regularizer.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: the state must be a dict (what state_dict() returns), got "
                            f"{type(state).__name__}")
        missing = [k for k in ("steps", "targets") if k not in state]
        if missing:
            raise ValueError(f"{fn}: the state lacks {missing}; it is not a regularizer's state")
        saved_targets = state["targets"]
        if not isinstance(saved_targets, Mapping):
            raise TypeError(f"{fn}: targets must be a dict of per-target settings")
        names = set(saved_targets)
        if names != set(self.targets):
            raise ValueError(
                f"{fn}: targets differ; missing {sorted(set(self.targets) - names)}, "
                f"unexpected {sorted(names - set(self.targets))}")
        coupled = state.get("coupled", {})
        if not isinstance(coupled, Mapping):
            raise TypeError(f"{fn}: coupled must be a dict of per-set settings")
        if set(coupled) != set(self.coupled):
            raise ValueError(
                f"{fn}: coupled sets differ; missing {sorted(set(self.coupled) - set(coupled))}, "
                f"unexpected {sorted(set(coupled) - set(self.coupled))}")
        # every setting applied to a copy and checked; the originals are written only below
        staged = {}
        for name, config in [*saved_targets.items(), *coupled.items()]:
            original = self.targets.get(name) if name in saved_targets else self.coupled[name]
            if not isinstance(config, Mapping):
                raise TypeError(f"{fn}: the settings of {name} must be a dict, got "
                                f"{type(config).__name__}")
            copy = dataclasses.replace(original)
            _presets.apply_override(copy, config)
            if isinstance(copy, Target):
                if not isinstance(copy.kind, str):
                    raise TypeError(f"{fn}: {name}: kind must be a string, got {copy.kind!r}")
                _presets.check_dim(copy)
            staged[name] = (original, copy)
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
        prox = state.get("prox", "auto")
        if prox not in PROX_MODES:
            raise ValueError(f"{fn}: prox must be one of {PROX_MODES}, got {prox!r}")
        if (self.controller is None) != ("controller" not in state):
            raise ValueError(f"{fn}: the saved regularizer "
                             f"{'had' if 'controller' in state else 'had no'} target, this one "
                             f"{'has none' if self.controller is None else 'has one'}")
        controller = None if self.controller is None else \
            self.controller.check_state(state["controller"], fn)
        # all checked: apply (in place: the controller's layers hold these targets)
        for original, copy in staged.values():
            for key in copy.config():
                setattr(original, key, getattr(copy, key))
        self.steps, self.prox = steps, prox
        if controller is not None:
            self.controller.set_state(controller)


def _penalty(t: Target) -> torch.Tensor | None:
    w = t.param
    terms = []
    if t.lam_l1 > 0:
        terms.append(t.lam_l1 * w.abs().sum())
    if t.lam_group > 0:
        norms = ops.group_norms(w, t.dim)
        c = math.sqrt(w.numel() / max(norms.numel(), 1)) if t.size_weighted else 1.0
        terms.append(t.lam_group * c * norms.sum())
    if t.lam_exclusive > 0:
        dims = list(range(1, w.dim())) if t.dim is None else t.dim
        l1 = w.abs().sum(dim=dims) if dims != () else w.abs()
        terms.append(0.5 * t.lam_exclusive * (l1 * l1).sum())
    if not terms:
        return None
    total = sum(terms[1:], terms[0])
    return total.full_tensor() if is_dtensor(total) else total
