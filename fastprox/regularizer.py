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
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Iterable, Mapping

import torch
from torch import nn

from . import _checks, _rules, coupled as _coupled, groups as _groups, metric as _metric, ops, \
    target as _target
from ._checks import is_dtensor
from ._modules import CONV as _CONV, WEIGHTED as _WEIGHTED
from .coupled import CoupledGroups

PRESETS = ("group_lasso", "sparse_group_lasso", "lasso", "exclusive", "cges")
COUPLED_PRESETS = _groups.PRESETS  # channels, neurons, heads
PROX_MODES = ("auto", "metric", "euclidean")


@dataclasses.dataclass
class Target:
    """One regularized tensor: its thresholds, groups and options (see the module docstring)."""

    name: str
    param: torch.Tensor
    kind: str
    lam_l1: float = 0.0
    lam_group: float = 0.0
    lam_exclusive: float = 0.0
    dim: int | tuple | None = None
    size_weighted: bool = True
    exact: bool = True

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "param")}


@dataclasses.dataclass
class CoupledTarget:
    """One coupled set (fastprox.groups) and its thresholds: the penalty
    ``lam_l1 ||W||_1 + lam_group sum_g c_g ||W_g|| + (lam_exclusive/2) sum_g ||W_g||_1^2`` over
    its groups (``c_g = sqrt(n_g)`` when ``size_weighted``). ``params``: the parameters its
    members are slices of (one learning rate must hold for all of them)."""

    name: str
    groups: CoupledGroups
    params: list
    lam_l1: float = 0.0
    lam_group: float = 0.0
    lam_exclusive: float = 0.0
    size_weighted: bool = True
    exact: bool = True

    def config(self) -> dict:
        return {f: getattr(self, f) for f in ("lam_l1", "lam_group", "lam_exclusive",
                                               "size_weighted", "exact")}


@dataclasses.dataclass(frozen=True)
class CGESSchedule:
    """CGES's per-layer mix of group and exclusive sparsity (Yoon & Hwang 2017).

    For the l-th regularized layer (0-based, in model order)::

        lam_group     = lam * clamp(mu - step * l, 0, 1)       * group_scales[l]
        lam_exclusive = lam * clamp(1 - mu + step * l, 0, 1)   * exclusive_scales[l]

    Lower layers get more group sparsity (remove inputs), upper ones more exclusive sparsity
    (competition within a group). The defaults are the published ones, whose scales were set
    for the paper's conv5x5x32 - conv5x5x64 - fc1024 - fc10 network; layers past the end of a
    scale list get scale 1. The clamp only matters past 4 layers (published: l = 0..3).
    """

    mu: float = 0.8
    step: float = 0.2
    group_scales: tuple = (1.0, 1.0, 1 / 15, 1 / 144)
    exclusive_scales: tuple = (1.0, 0.5, 15.0, 144.0)

    def weights(self, layer: int) -> tuple[float, float]:
        def scale(values, i):
            return values[i] if i < len(values) else 1.0

        group = min(max(self.mu - self.step * layer, 0.0), 1.0)
        exclusive = min(max(1.0 - self.mu + self.step * layer, 0.0), 1.0)
        return (group * scale(self.group_scales, layer),
                exclusive * scale(self.exclusive_scales, layer))


def _preset_dim(kind: str, weight: torch.Tensor, module: nn.Module | None):
    """The groups a preset regularizes: the outgoing weights of each input unit.

    Linear (out, in): columns, dim=0; Hugging Face Conv1D (in, out): rows, dim=1. Conv
    (O, I, k...): group lasso takes input channels (0, 2, 3...); exclusive and CGES take each
    input position across filters, dim=0 (CGES)."""
    is_conv = isinstance(module, _CONV) if module is not None else weight.dim() > 2
    if kind == "lasso":
        return None
    if module is not None and _groups._out_axis(module) == 1:
        return 1
    if is_conv and kind in ("group_lasso", "sparse_group_lasso"):
        return (0, *range(2, weight.dim()))
    return 0


def _check_lam(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Regularizer: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Regularizer: {name} must be a finite number >= 0, got {value}")
    return float(value)


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
        coupled = _coupled_kinds(preset)
        if preset is not None and preset not in PRESETS and not coupled:
            raise ValueError(f"Regularizer: preset must be one of {PRESETS}, one of "
                             f"{COUPLED_PRESETS} (or a tuple of them) or None, got {preset!r}")
        lam = _check_lam(lam, "lam")
        lam_l1 = lam if lam_l1 is None else _check_lam(lam_l1, "lam_l1")
        self.targets: dict[str, Target] = {}
        self.coupled: dict[str, CoupledTarget] = {}
        self.skipped: list[tuple[str, str]] = []
        self.found = None  # the coupled presets' discovery (fastprox.groups.Found)
        self.steps = 0
        self.prox = "auto"  # which proximal step prox_step takes (see attach)
        self.controller: _target.Controller | None = None
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
        _check_names(model, exclude, "exclude")
        if coupled:
            self._build_coupled(model, coupled, lam, exclude, overrides, example_inputs,
                                forward_fn)
            return
        schedule = schedule or CGESSchedule()
        overrides = dict(overrides or {})
        used = set()

        def matches(name: str, keys) -> str | None:
            for key in keys:
                if name == key or name.startswith(key + "."):
                    return key
            return None

        layer = 0
        for module_name, module, pname, param in _weights(model):
            if matches(pname, exclude):
                continue
            keys = sorted(k for k in overrides if matches(pname, [k]))
            settings = {}
            for key in keys:  # a module's settings first, then a parameter's own
                used.add(key)
                settings.update(overrides[key])
            kind = settings.pop("kind", preset)
            if kind not in PRESETS:
                raise ValueError(f"Regularizer: {pname}: kind must be one of {PRESETS}, got "
                                 f"{kind!r}")
            strength = _check_lam(settings.pop("lam", lam), f"{pname}.lam")
            target = _preset_target(kind, pname, param, module, strength, lam_l1, layer,
                                    schedule)
            layer += 1
            _apply_override(target, settings)
            _check_dim(target)
            self.targets[pname] = target
            if bias_l1 is not None and module is not None and getattr(module, "bias", None) \
                    is not None and not matches(f"{module_name}.bias", exclude):
                bname = f"{module_name}.bias" if module_name else "bias"
                self.targets[bname] = Target(bname, module.bias, "lasso",
                                             lam_l1=_check_lam(bias_l1, "bias_l1"))
        unknown = set(overrides) - used
        if unknown:
            raise ValueError(f"Regularizer: overrides name no regularized parameter: "
                             f"{sorted(unknown)}")
        if isinstance(model, nn.Module):
            kept = {id(t.param) for t in self.targets.values()}
            for pname, param in model.named_parameters():
                if id(param) not in kept:
                    self.skipped.append((pname, _why_skipped(model, pname, param, exclude)))

    def _controller(self, model, target: _target.SparsityTarget) -> _target.Controller:
        every = {**self.targets, **self.coupled}
        # default: every weight's groups (1-D targets, L1 on biases, have no units)
        names = [n for n, t in every.items() if not isinstance(t, Target) or t.param.dim() > 1] \
            if target.layers is None else list(target.layers)
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ValueError(f"Regularizer: target.layers names no regularized tensor or coupled "
                             f"set: {unknown} (they are: {sorted(every)})")
        layers = []
        for name in names:
            t = every[name]
            if isinstance(t, CoupledTarget):
                layers.append(_target.coupled_layer(t))
            else:
                dims = _checks.normalize_dim(t.dim, t.param, "Regularizer")
                layers.append(_target.plain_layer(t, dims))
        count = None
        if target.measure != "units" and not self.coupled and isinstance(model, nn.Sequential):
            from .stats import sparsity_stats

            count = _target.sequential_count(model, target.example_input, sparsity_stats)
        return _target.Controller(target, layers, count)

    def _build_coupled(self, model, kinds, lam, exclude, overrides, example_inputs, forward_fn):
        if not isinstance(model, nn.Module):
            raise TypeError("Regularizer: the coupled presets need an nn.Module (its groups are "
                            "discovered from the model)")
        found = _groups.discover(model, kinds, example_inputs=example_inputs,
                                 forward_fn=forward_fn, exclude=tuple(exclude))
        params = dict(model.named_parameters())
        overrides = dict(overrides or {})
        used = set()
        for coupled in found.sets:
            names = sorted({m.name.split("[")[0] for m in coupled.slices})
            target = CoupledTarget(coupled.name, coupled, [params[n] for n in names],
                                   lam_group=lam)
            for key in sorted(overrides, key=lambda k: k not in COUPLED_PRESETS):
                # a kind (every set of it) first, then a set, its module, or a parameter name
                if key == coupled.unit.kind or key == coupled.name or \
                        key == coupled.unit.module or any(
                            n == key or n.startswith(key + ".") for n in names):
                    used.add(key)
                    _apply_override(target, overrides[key])
            self.coupled[coupled.name] = target
        unknown = set(overrides) - used
        if unknown:
            raise ValueError(f"Regularizer: overrides name no coupled set or module: "
                             f"{sorted(unknown)}")
        self.found = found
        self.skipped = list(found.skipped)

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
        target = Target(name, param, kind, _check_lam(lam_l1, "lam_l1"),
                        _check_lam(lam_group, "lam_group"),
                        _check_lam(lam_exclusive, "lam_exclusive"), dim, size_weighted, exact)
        _check_dim(target)
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
        self._prox_of(optimizer, prox, "Regularizer.attach")
        self._lr_of(optimizer)  # fails now, not at the first step, if a target is missing
        self.prox = prox
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.prox_step(opt))

    @staticmethod
    def _prox_of(optimizer, prox: str, fn: str) -> str:
        """The step ``prox`` asks for with this optimizer: "metric" or "euclidean"."""
        if prox not in PROX_MODES:
            raise ValueError(f"{fn}: prox must be one of {PROX_MODES}, got {prox!r}")
        adam = isinstance(optimizer, _metric.ADAMS)
        if prox == "metric" and not adam:
            raise ValueError(f"{fn}: prox='metric' needs torch.optim.Adam or AdamW (the "
                             f"metric is their second moment), got {type(optimizer).__name__}")
        if prox == "auto":
            if adam:
                return "metric"
            if not isinstance(optimizer, torch.optim.SGD):
                raise ValueError(
                    f"{fn}: no exact proximal step is known for {type(optimizer).__name__}'s "
                    "steps (fastprox takes Adam and AdamW in their metric, SGD in the Euclidean "
                    "one); pass prox='euclidean' for the Euclidean step with thresholds "
                    "lr * lam (a heuristic for this optimizer)")
            return "euclidean"
        return prox

    def _lr_of(self, optimizer) -> dict[int, object]:
        lrs = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                lrs[id(p)] = group["lr"]
        missing = [t.name for t in self.targets.values() if id(t.param) not in lrs]
        missing += [t.name for t in self.coupled.values()
                    if any(id(p) not in lrs for p in t.params)]
        if missing:
            raise ValueError(f"Regularizer: {missing} are not parameters of the optimizer")
        return lrs

    @torch.no_grad()
    def prox_step(self, optimizer: torch.optim.Optimizer | None = None, *, lr=None,
                  prox: str | None = None) -> None:
        """The proximal step of every target.

        With an Adam / AdamW ``optimizer`` and ``prox`` (default: ``reg.prox``, set by
        ``attach``) "auto" or "metric": the step in the optimizer's metric (see ``attach``),
        thresholds ``lam``; a parameter the optimizer has not stepped yet (no state) is left
        as it is. Otherwise the Euclidean step, thresholds ``lr * lam``: ``lr`` is the
        parameter group's current lr of ``optimizer``, or the ``lr`` given (a number or a 0-d
        tensor). All targets on one device go through one ``foreach_prox_``
        call (the dispatcher picks the device's kernel: fused on the CPU and on CUDA with
        Triton, the C++ kernels on a host copy elsewhere). Sharded targets (DTensor parameters,
        as under FSDP2's ``fully_shard``) go through a call of their own, which
        ``foreach_prox_`` hands to ``fastprox.distributed``: every rank must take the step."""
        if (optimizer is None) == (lr is None):
            raise ValueError("Regularizer.prox_step: give an optimizer or an lr, not both")
        if optimizer is not None and self._prox_of(optimizer, prox or self.prox,
                                                   "Regularizer.prox_step") == "metric":
            self._metric_step(optimizer)
            self.steps += 1
            if self.controller is not None:
                self.controller.after_step()
            return
        lrs = self._lr_of(optimizer) if optimizer is not None else None
        by_device: dict[object, list[Target]] = {}
        for t in self.targets.values():  # sharded targets apart: plain ones keep the fast path
            by_device.setdefault("sharded" if is_dtensor(t.param) else t.param.device,
                                 []).append(t)
        # every check before anything is written: one learning rate per coupled set, and the
        # thresholds it gives (finite, >= 0)
        coupled, coupled_lams = list(self.coupled.values()), []
        for t in coupled:
            rate = lr
            if lrs is not None:
                rates = {id(p): lrs[id(p)] for p in t.params}
                values = list(rates.values())
                if any(v is not values[0] and v != values[0] for v in values[1:]):
                    raise ValueError(f"Regularizer.prox_step: the parameters of {t.name} are in "
                                     "parameter groups with different learning rates; a coupled "
                                     "group needs one")
                rate = values[0]
            coupled_lams.append(tuple(
                _coupled._threshold(rate * lam, f"lr * {name} of {t.name}",
                                    "Regularizer.prox_step")
                for name, lam in (("lam_l1", t.lam_l1), ("lam_group", t.lam_group),
                                  ("lam_exclusive", t.lam_exclusive))))
        for device, targets in by_device.items():
            rates = [lrs[id(t.param)] if lrs is not None else lr for t in targets]
            args = dict(
                lam_l1=[r * t.lam_l1 for r, t in zip(rates, targets)],
                lam_group=[r * t.lam_group for r, t in zip(rates, targets)],
                lam_exclusive=[r * t.lam_exclusive for r, t in zip(rates, targets)],
                dim=[t.dim for t in targets],
                size_weighted=[t.size_weighted for t in targets],
                exact=[t.exact for t in targets])
            ops.foreach_prox_([t.param for t in targets], **args)
        # every coupled set in one go: sets that share no tensor run together (coupled.waves)
        _coupled.step_sets([t.groups for t in coupled], coupled_lams,
                           [t.size_weighted for t in coupled], [t.exact for t in coupled],
                           max_newton_steps=_rules.MAX_NEWTON_STEPS)
        self.steps += 1
        if self.controller is not None:
            self.controller.after_step()

    def _metric_step(self, optimizer) -> None:
        """Every target in the Adam / AdamW step's metric: plain targets in one
        ``foreach_metric_prox_`` call per device (sharded ones in one of their own), coupled
        sets one after another in one fused call (``metric.coupled_metric_step``)."""
        self._lr_of(optimizer)
        fn = "Regularizer.prox_step"
        state = _metric.AdamState(optimizer)
        by_device: dict[object, list] = {}
        for t in self.targets.values():
            found = state.metric(t.param)
            if found is None or (t.lam_l1 == 0 and t.lam_group == 0 and t.lam_exclusive == 0):
                continue
            by_device.setdefault("sharded" if is_dtensor(t.param) else t.param.device,
                                 []).append((t, found))
        # every check before anything is written: coupled sets' metrics and thresholds
        coupled = []
        for t in self.coupled.values():
            found = state.coupled(t.groups, fn)
            if found is not None and (t.lam_l1 > 0 or t.lam_group > 0 or t.lam_exclusive > 0):
                coupled.append((t, found))
        for pairs in by_device.values():
            targets, found = zip(*pairs)
            v, lr, eps, beta2, step = zip(*found)
            _metric.foreach_metric_prox_(
                [t.param for t in targets], list(v), lr=list(lr), eps=list(eps),
                beta2=list(beta2), step=list(step),
                lam_l1=[t.lam_l1 for t in targets], lam_group=[t.lam_group for t in targets],
                lam_exclusive=[t.lam_exclusive for t in targets], dim=[t.dim for t in targets],
                size_weighted=[t.size_weighted for t in targets],
                exact=[t.exact for t in targets])
        if coupled:  # every set in one fused call, one after another
            sets = [t.groups for t, _ in coupled]
            _metric.coupled_metric_step(
                sets, [views for _, (views, _) in coupled], [rows for _, (_, rows) in coupled],
                [(t.lam_l1, t.lam_group, t.lam_exclusive) for t, _ in coupled],
                [t.size_weighted for t, _ in coupled], [t.exact for t, _ in coupled],
                names=[[f"member {k} ({m.name}) of {g.name}: the second moment (exp_avg_sq)"
                        for k, m in enumerate(g.slices)] for g in sets])

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
            _apply_override(copy, config)
            if isinstance(copy, Target):
                if not isinstance(copy.kind, str):
                    raise TypeError(f"{fn}: {name}: kind must be a string, got {copy.kind!r}")
                _check_dim(copy)
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


def _preset_target(kind: str, name: str, param, module, lam: float, lam_l1: float, layer: int,
                   schedule: CGESSchedule) -> Target:
    """The target a preset makes of one weight (``layer``: its index among the regularized)."""
    target = Target(name, param, kind, dim=_preset_dim(kind, param, module))
    if kind == "group_lasso":
        target.lam_group = lam
    elif kind == "sparse_group_lasso":
        target.lam_group, target.lam_l1 = lam, lam_l1
    elif kind == "lasso":
        target.lam_l1 = lam
    elif kind == "exclusive":
        target.lam_exclusive = lam
    else:  # cges
        wg, we = schedule.weights(layer)
        target.lam_group, target.lam_exclusive = lam * wg, lam * we
        target.size_weighted, target.exact = False, False
    return target


def _apply_override(target, values: Mapping) -> None:
    """Sets the given fields of a Target or a CoupledTarget, checked (thresholds are numbers,
    a coupled target's flags bools; a Target's dim and flags are checked by _check_dim)."""
    coupled = isinstance(target, CoupledTarget)
    fields = set(target.config()) if coupled else \
        {f.name for f in dataclasses.fields(Target)} - {"name", "param"}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"Regularizer: unknown setting {key!r} for {target.name} "
                             f"(expected one of {sorted(fields)})")
        if key.startswith("lam"):
            value = _check_lam(value, f"{target.name}.{key}")
        elif coupled:
            _checks.check_flag(value, key, f"Regularizer: {target.name}")
        setattr(target, key, value)


def _coupled_kinds(preset) -> tuple:
    """The coupled presets named by ``preset`` (a name or a tuple of names), else ()."""
    kinds = (preset,) if isinstance(preset, str) else preset
    if isinstance(kinds, (tuple, list)) and kinds and all(
            isinstance(k, str) and k in COUPLED_PRESETS for k in kinds):
        return tuple(kinds)
    if isinstance(preset, (tuple, list)):
        raise ValueError(f"Regularizer: a tuple preset names coupled presets "
                         f"{COUPLED_PRESETS}, got {preset!r}")
    return ()


def _names_of(model) -> set[str]:
    if isinstance(model, nn.Module):
        names = {n for n, _ in model.named_modules() if n}
        return names | {n for n, _ in model.named_parameters()}
    names = set()
    for pname, _ in model:
        parts = pname.split(".")
        names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def _check_names(model, keys, what: str) -> None:
    if not keys:
        return
    if not isinstance(model, nn.Module):
        model = list(model)
    unknown = sorted(k for k in keys if k not in _names_of(model))
    if unknown:
        raise ValueError(f"Regularizer: {what} names no module or parameter of the model: "
                         f"{unknown}")


def _check_dim(target: Target) -> None:
    """A target's dim must fit its tensor (checked when the regularizer is built, not inside
    optimizer.step())."""
    if target.dim is not None and not _checks.is_dim_spec(target.dim):
        raise TypeError(f"Regularizer: {target.name}: dim must be None, an int or a tuple, got "
                        f"{target.dim!r}")
    _checks.normalize_dim(target.dim, target.param, f"Regularizer: {target.name}")
    for flag in ("size_weighted", "exact"):
        _checks.check_flag(getattr(target, flag), flag, f"Regularizer: {target.name}")


def _why_skipped(model: nn.Module, pname: str, param, exclude) -> str:
    mname = pname.rsplit(".", 1)[0] if "." in pname else ""
    if any(pname == k or pname.startswith(k + ".") or mname == k or mname.startswith(k + ".")
           for k in exclude):
        return "excluded"
    module = model.get_submodule(mname) if mname else model
    if param.dim() < 2:
        return f"a 1-D {pname.rsplit('.', 1)[-1]} of {type(module).__name__} (biases: bias_l1)"
    return f"not a Linear/conv/Conv1D weight or packed attention projection " \
           f"({type(module).__name__})"


def _weights(model):
    """(module name, module, parameter name, weight) of every regularizable weight."""
    if isinstance(model, nn.Module):
        dense = _groups._dense_types()
        for mname, module in model.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(module, (*_WEIGHTED, *dense)):
                yield mname, module, prefix + "weight", module.weight
            elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                # the packed q, k, v projections: a Linear weight (3 * embed_dim, embed_dim)
                yield mname, None, prefix + "in_proj_weight", module.in_proj_weight
        return
    for pname, param in model:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"Regularizer: {pname} is not a tensor")
        if param.dim() >= 2:
            yield pname.rsplit(".", 1)[0] if "." in pname else "", None, pname, param


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
