"""What the presets regularize: the targets a preset makes of a model, checked.

A ``Target`` is one regularized tensor with its thresholds and groups, a ``CoupledTarget`` one
coupled set (fastprox.groups) with its thresholds. ``plain_targets`` walks a model's weights
(every Linear, conv, Hugging Face ``Conv1D`` and packed attention projection: ``weights``) and
makes each the target of a preset (``preset_target``: group lasso on input units, sparse group
lasso, lasso, exclusive, CGES with its per-layer ``CGESSchedule``); ``coupled_targets`` puts
group lasso on every coupled set the coupled presets discover. Overrides are applied and every
setting checked here; each parameter left out is returned with the reason. The Regularizer
(fastprox/regularizer.py) holds what they return.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Mapping

import torch
from torch import nn

from . import _checks, groups as _groups
from ._modules import CONV as _CONV, WEIGHTED as _WEIGHTED
from .coupled import CoupledGroups

PRESETS = ("group_lasso", "sparse_group_lasso", "lasso", "exclusive", "cges")
COUPLED_PRESETS = _groups.PRESETS  # channels, neurons, heads


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


def check_lam(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Regularizer: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Regularizer: {name} must be a finite number >= 0, got {value}")
    return float(value)


def plain_targets(model, preset: str, lam: float, lam_l1: float, exclude: set, overrides,
                  bias_l1, schedule) -> tuple[dict, list]:
    """(targets by parameter name, skipped (name, reason) pairs) of a plain preset on a model's
    weights (``weights``: every Linear, conv, Conv1D and packed attention projection), its
    overrides applied and checked."""
    targets: dict[str, Target] = {}
    skipped: list[tuple[str, str]] = []
    overrides = dict(overrides or {})
    used = set()

    def matches(name: str, keys) -> str | None:
        for key in keys:
            if name == key or name.startswith(key + "."):
                return key
        return None

    layer = 0
    for module_name, module, pname, param in weights(model):
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
        strength = check_lam(settings.pop("lam", lam), f"{pname}.lam")
        target = preset_target(kind, pname, param, module, strength, lam_l1, layer, schedule)
        layer += 1
        apply_override(target, settings)
        check_dim(target)
        targets[pname] = target
        if bias_l1 is not None and module is not None and getattr(module, "bias", None) \
                is not None and not matches(f"{module_name}.bias", exclude):
            bname = f"{module_name}.bias" if module_name else "bias"
            targets[bname] = Target(bname, module.bias, "lasso",
                                    lam_l1=check_lam(bias_l1, "bias_l1"))
    unknown = set(overrides) - used
    if unknown:
        raise ValueError(f"Regularizer: overrides name no regularized parameter: "
                         f"{sorted(unknown)}")
    if isinstance(model, nn.Module):
        kept = {id(t.param) for t in targets.values()}
        for pname, param in model.named_parameters():
            if id(param) not in kept:
                skipped.append((pname, why_skipped(model, pname, param, exclude)))
    return targets, skipped


def coupled_targets(model, kinds: tuple, lam: float, exclude: set, overrides, example_inputs,
                    forward_fn) -> tuple[dict, object, list]:
    """(coupled targets by set name, the discovery (fastprox.groups.Found), skipped pairs) of
    the coupled presets ``kinds`` on a model: group lasso (lam_group = lam) on every coupled
    set, its overrides (a kind, a set, its module or a member's name) applied and checked."""
    if not isinstance(model, nn.Module):
        raise TypeError("Regularizer: the coupled presets need an nn.Module (its groups are "
                        "discovered from the model)")
    found = _groups.discover(model, kinds, example_inputs=example_inputs,
                             forward_fn=forward_fn, exclude=tuple(exclude))
    params = dict(model.named_parameters())
    overrides = dict(overrides or {})
    used = set()
    out: dict[str, CoupledTarget] = {}
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
                apply_override(target, overrides[key])
        out[coupled.name] = target
    unknown = set(overrides) - used
    if unknown:
        raise ValueError(f"Regularizer: overrides name no coupled set or module: "
                         f"{sorted(unknown)}")
    return out, found, list(found.skipped)


def preset_target(kind: str, name: str, param, module, lam: float, lam_l1: float, layer: int,
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


def apply_override(target, values: Mapping) -> None:
    """Sets the given fields of a Target or a CoupledTarget, checked (thresholds are numbers,
    a coupled target's flags bools; a Target's dim and flags are checked by check_dim)."""
    coupled = isinstance(target, CoupledTarget)
    fields = set(target.config()) if coupled else \
        {f.name for f in dataclasses.fields(Target)} - {"name", "param"}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"Regularizer: unknown setting {key!r} for {target.name} "
                             f"(expected one of {sorted(fields)})")
        if key.startswith("lam"):
            value = check_lam(value, f"{target.name}.{key}")
        elif coupled:
            _checks.check_flag(value, key, f"Regularizer: {target.name}")
        setattr(target, key, value)


def coupled_kinds(preset) -> tuple:
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


def check_names(model, keys, what: str) -> None:
    if not keys:
        return
    if not isinstance(model, nn.Module):
        model = list(model)
    unknown = sorted(k for k in keys if k not in _names_of(model))
    if unknown:
        raise ValueError(f"Regularizer: {what} names no module or parameter of the model: "
                         f"{unknown}")


def check_dim(target: Target) -> None:
    """A target's dim must fit its tensor (checked when the regularizer is built, not inside
    optimizer.step())."""
    if target.dim is not None and not _checks.is_dim_spec(target.dim):
        raise TypeError(f"Regularizer: {target.name}: dim must be None, an int or a tuple, got "
                        f"{target.dim!r}")
    _checks.normalize_dim(target.dim, target.param, f"Regularizer: {target.name}")
    for flag in ("size_weighted", "exact"):
        _checks.check_flag(getattr(target, flag), flag, f"Regularizer: {target.name}")


def why_skipped(model: nn.Module, pname: str, param, exclude) -> str:
    mname = pname.rsplit(".", 1)[0] if "." in pname else ""
    if any(pname == k or pname.startswith(k + ".") or mname == k or mname.startswith(k + ".")
           for k in exclude):
        return "excluded"
    module = model.get_submodule(mname) if mname else model
    if param.dim() < 2:
        return f"a 1-D {pname.rsplit('.', 1)[-1]} of {type(module).__name__} (biases: bias_l1)"
    return f"not a Linear/conv/Conv1D weight or packed attention projection " \
           f"({type(module).__name__})"


def weights(model):
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
