"""The demo's experiments: models, methods, one training run, and what is measured after it.

Three tasks (``docs/SPEC.md`` has the published set-ups):

- ``digits``: Scardapane et al.'s MLP 64-40-20-10 (leaky ReLU, Glorot-normal init, batch 300)
  on sklearn DIGITS; every method of the paper (none, L2, L1, group lasso, sparse group lasso)
  as the published penalty in the loss (Adam) and, for the sparse ones, as fastprox's proximal
  step (SGD, see below); exclusive lasso (exact prox), CGES (its per-layer schedule), L0 gates.
- ``diabetes``: the TF demo's regression MLP 10-20-15-1 (1500 full-batch steps), group lasso
  vs none.
- ``cnn``: a small CNN on the 8x8 DIGITS images: group lasso on conv input channels and CGES
  (its own per-position groups) vs none.
- ``resnet``: a small ResNet (BasicBlocks, BatchNorm, a downsample shortcut) on the 8x8 DIGITS
  images: group lasso on coupled channel groups (fastprox.groups.channels: residual channels
  coupled across the stage) vs none.
- ``transformer``: a small transformer on DIGITS, each image row a token: group lasso on
  coupled attention-head and MLP-neuron groups vs none.

For the last two, the model is compacted through its coupled groups (``fastprox.compact(model,
groups)``) and the table gives channels, heads and neurons kept, parameters, FLOPs
(``torch.utils.flop_counter``) and the measured CPU latency of the compacted model against the
dense one.

A unit (input feature, hidden unit, channel) is alive when its outgoing weights are not all
zero, or for L0 when its gate is open at test time. Proximal steps and L0 gates give exact zeros.
A penalty in the loss does not: its weights are pruned after training with the seeds' own
criterion (Scardapane's code: a group is dead when all its weights round to 0 at 3 decimals;
the TF demo: when its sum of magnitudes is at most 1e-3), and that pruned model is the one
evaluated and compacted.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from typing import Callable

import torch
from torch import nn

from .. import compact, coupled_stats, groups as groups_mod, l0 as l0mod, \
    recalibrate_batchnorm, sparsity_stats, SparsityHistory
from ..regularizer import CGESSchedule, Regularizer
from ..target import SparsityTarget
from . import data
from .models import BasicBlock, ResNet, RowTransformer


@dataclasses.dataclass(frozen=True)
class Method:
    """One training run of the demo.

    ``update``: ``"none"``, ``"penalty"`` (``lam`` times the penalty added to the loss),
    ``"prox"`` (fastprox's proximal step after every optimizer step, threshold ``lr * lam``) or
    ``"l0"`` (hard-concrete gates, expected-L0 penalty). ``options``: further ``Regularizer``
    arguments."""

    name: str
    task: str
    label: str
    update: str
    preset: str | tuple | None = None  # a Regularizer preset (or coupled presets), or "l2"
    lam: float = 0.0
    optimizer: str = "adam"    # "sgd": SGD with momentum 0.9; "adamw": AdamW (weight decay 0.01)
    lr: float = 1e-3           # Adam's default, as in the seeds' code
    prox: str = "auto"         # Regularizer.attach's prox: the metric step with Adam / AdamW
    # a SparsityTarget's fields (kept, measure, layers, per_layer) and ``at``: the fraction of
    # the training by which it is reached (its by_step), the mask held after
    target: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    options: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
    # the name of a run whose compacted widths (and input features) this one trains from
    # scratch, with its own recipe: pruning while training against the same small model (three
    # initializations, seeds seed..seed+2; the row is the median's)
    scratch_of: str | None = None


# Scardapane et al.: every penalty at 10^-3.5 in the loss, Adam. The proximal runs use SGD with
# momentum: Adam scales every weight's step to about lr, so a proximal threshold lr * lam * sqrt(n)
# either leaves the groups alone (lam well below 1) or zeroes all of them (lam >= 1) -- the
# "gl-prox-adam" run shows it. The strengths of the proximal and L0 runs were chosen on a
# validation split of the training set (``--validation``), not on the test set.
SCARDAPANE_LAM = 10 ** -3.5
_SGD = dict(optimizer="sgd", lr=0.05)
# AdamW (weight decay 0.01) at lr 1e-2: the proximal step in its metric (Regularizer.attach's
# default for Adam and AdamW). Its thresholds are the penalty's own lam, not lr * lam.
_ADAMW = dict(optimizer="adamw", lr=1e-2)
_ADAMW_DEFAULT = dict(optimizer="adamw", lr=1e-3)
# The CNN's CGES: CGES's own groups (one input position across all filters; a channel goes when
# all its positions do), exact exclusive prox, and scales 1 on every layer: the published scales
# (1/144 and 144 on the last layer) were set for the paper's 4-layer net and zero this one's
# classifier within about a hundred steps.
_CNN_CGES = dict(schedule=CGESSchedule(group_scales=(1.0,), exclusive_scales=(1.0,)),
                 overrides={name: {"exact": True} for name in ("0", "2", "5", "9")})

# The ResNet's channel groups are not size-weighted: a residual channel's group spans every
# block of its stage (hundreds of weights), and sqrt(n_g) weighting left only the small groups
# prunable at any strength that kept the accuracy. The transformer's neurons (65 weights each)
# take a lower strength than its heads (about a thousand). Strengths chosen on the validation
# split.
_RESNET_CHANNELS = dict(overrides={"channels": {"size_weighted": False}})
_TRANSFORMER_UNITS = dict(overrides={"neurons": {"lam_group": 4e-3}})

METHODS = [
    Method("none", "digits", "none", "none"),
    Method("none-sgd", "digits", "none (SGD)", "none", **_SGD),
    Method("l2", "digits", "L2 (penalty)", "penalty", "l2", SCARDAPANE_LAM),
    Method("l1", "digits", "L1 (penalty)", "penalty", "lasso", SCARDAPANE_LAM),
    Method("l1-prox", "digits", "L1 (prox)", "prox", "lasso", 1e-2, **_SGD),
    Method("gl", "digits", "group lasso (penalty)", "penalty", "group_lasso", SCARDAPANE_LAM),
    Method("gl-prox", "digits", "group lasso (prox)", "prox", "group_lasso", 1.5e-2, **_SGD),
    Method("gl-prox-adam", "digits", "group lasso (prox, Adam)", "prox", "group_lasso", 0.3,
           prox="euclidean"),
    Method("none-adamw", "digits", "none (AdamW)", "none", **_ADAMW),
    Method("gl-metric", "digits", "group lasso (metric prox)", "prox", "group_lasso", 1.5e-3,
           **_ADAMW),
    Method("gl-metric-layers", "digits", "group lasso (metric prox), target 50 % of every "
           "layer's units", "prox", "group_lasso", 1e-3, **_ADAMW,
           target=dict(kept=0.5, per_layer=True, at=0.6)),
    Method("gl-metric-hidden", "digits", "group lasso (metric prox), target 50 % of hidden units",
           "prox", "group_lasso", 1e-3, **_ADAMW,
           target=dict(kept=0.5, layers=("2.weight", "4.weight"), at=0.6)),
    Method("gl-metric-flops", "digits", "group lasso (metric prox), target 50 % of FLOPs",
           "prox", "group_lasso", 1e-3, **_ADAMW, target=dict(kept=0.5, measure="flops", at=0.6)),
    # the targets with AdamW at torch's default lr: 25 % of the hidden units (one pool of both
    # hidden layers) and 25 % of the FLOPs, reached gradually by 60 % of the training, each
    # beside the same small model trained from scratch with the same recipe
    Method("none-adamw-default", "digits", "none (AdamW)", "none", **_ADAMW_DEFAULT),
    Method("gl-target-hidden", "digits", "group lasso (metric prox), target 25 % of hidden "
           "units", "prox", "group_lasso", 1e-3, **_ADAMW_DEFAULT,
           target=dict(kept=0.25, layers=("2.weight", "4.weight"), at=0.6)),
    Method("gl-target-hidden-scratch", "digits", "its widths trained from scratch", "none",
           **_ADAMW_DEFAULT, scratch_of="gl-target-hidden"),
    Method("gl-target-flops", "digits", "group lasso (metric prox), target 25 % of FLOPs",
           "prox", "group_lasso", 1e-3, **_ADAMW_DEFAULT,
           target=dict(kept=0.25, measure="flops", at=0.6)),
    Method("gl-target-flops-scratch", "digits", "its widths trained from scratch", "none",
           **_ADAMW_DEFAULT, scratch_of="gl-target-flops"),
    Method("sgl", "digits", "sparse group lasso (penalty)", "penalty", "sparse_group_lasso",
           SCARDAPANE_LAM),
    Method("sgl-prox", "digits", "sparse group lasso (prox)", "prox", "sparse_group_lasso",
           7.5e-3, **_SGD),
    Method("exclusive", "digits", "exclusive lasso (prox)", "prox", "exclusive", 1e-2, **_SGD),
    Method("cges", "digits", "CGES (prox)", "prox", "cges", 3e-2, **_SGD),
    Method("l0", "digits", "L0 gates", "l0", None, 1.0, lr=1e-2),
    Method("diabetes-none", "diabetes", "none", "none"),
    Method("diabetes-gl", "diabetes", "group lasso (penalty)", "penalty", "group_lasso", 1e-3),
    Method("diabetes-gl-prox", "diabetes", "group lasso (prox)", "prox", "group_lasso", 0.1,
           **_SGD),
    Method("cnn-none", "cnn", "none (SGD)", "none", optimizer="sgd", lr=0.1),
    Method("cnn-gl-prox", "cnn", "group lasso (prox)", "prox", "group_lasso", 1e-3,
           optimizer="sgd", lr=0.1),
    Method("cnn-cges", "cnn", "CGES (prox)", "prox", "cges", 6e-3, optimizer="sgd", lr=0.1,
           options=_CNN_CGES),
    Method("resnet-none", "resnet", "none (SGD)", "none", optimizer="sgd", lr=0.05),
    Method("resnet-channels", "resnet", "channel groups (prox)", "prox", "channels", 0.2,
           optimizer="sgd", lr=0.05, options=_RESNET_CHANNELS),
    Method("transformer-none", "transformer", "none (SGD)", "none", optimizer="sgd", lr=0.05),
    Method("transformer-heads-neurons", "transformer", "head + neuron groups (prox)", "prox",
           ("heads", "neurons"), 1e-2, optimizer="sgd", lr=0.05, options=_TRANSFORMER_UNITS),
]
METHOD_NAMES = [m.name for m in METHODS]
TASKS = ("digits", "diabetes", "cnn", "resnet", "transformer")
COUPLED_TASKS = {"resnet": ("channels",), "transformer": ("heads", "neurons")}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Epochs of each task and how often units alive are recorded (``full``: the published 1500
    epochs on DIGITS)."""

    digits_epochs: int
    diabetes_epochs: int
    cnn_epochs: int
    record_every: int
    resnet_epochs: int = 80
    transformer_epochs: int = 40

    def epochs(self, task: str) -> int:
        return getattr(self, f"{task}_epochs")


SCHEDULES = {
    "quick": Schedule(digits_epochs=15, diabetes_epochs=60, cnn_epochs=3, record_every=5,
                      resnet_epochs=2, transformer_epochs=3),
    "default": Schedule(digits_epochs=300, diabetes_epochs=1500, cnn_epochs=100, record_every=10),
    # the CNN has no published schedule; its strengths were chosen for 100 epochs, and at 300 the
    # same strengths prune on (group lasso 88 %, CGES 80 % measured), so --full keeps 100
    "full": Schedule(digits_epochs=1500, diabetes_epochs=1500, cnn_epochs=100, record_every=25),
}
BATCH = {"digits": 300, "diabetes": None, "cnn": 100, "resnet": 100,
         "transformer": 100}  # None: full batch


# -- models ----------------------------------------------------------------------------------

def _glorot(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def digits_mlp() -> nn.Sequential:
    return _glorot(nn.Sequential(nn.Linear(64, 40), nn.LeakyReLU(), nn.Linear(40, 20),
                                 nn.LeakyReLU(), nn.Linear(20, 10)))


def narrow_mlp(widths: list[int], classes: int = 10) -> nn.Sequential:
    """An MLP of the given widths (inputs, hidden...), Glorot-normal, leaky ReLU."""
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU()]
    return _glorot(nn.Sequential(*layers, nn.Linear(widths[-1], classes)))


def diabetes_mlp() -> nn.Sequential:
    return _glorot(nn.Sequential(nn.Linear(10, 20), nn.LeakyReLU(), nn.Linear(20, 15),
                                 nn.LeakyReLU(), nn.Linear(15, 1)))


def digits_cnn() -> nn.Sequential:
    return _glorot(nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10)))


def digits_resnet() -> ResNet:
    return ResNet(BasicBlock, layers=(1, 1), widths=(8, 16), in_ch=1, classes=10)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits": digits_mlp, "diabetes": diabetes_mlp, "cnn": digits_cnn, "resnet": digits_resnet,
    "transformer": RowTransformer}


def _optimizer(method: Method, model: nn.Module) -> torch.optim.Optimizer:
    if method.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=method.lr, momentum=0.9)
    if method.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=method.lr)
    return torch.optim.Adam(model.parameters(), lr=method.lr)


def _regularizer(method: Method, model: nn.Module, steps: int = 0) -> Regularizer | None:
    if method.preset is None or method.preset == "l2":
        return None
    options = dict(method.options)
    if method.target is not None:
        fields = dict(method.target)
        at = fields.pop("at")
        options["target"] = SparsityTarget(by_step=max(int(at * steps), 1), **fields)
    return Regularizer(model, method.preset, method.lam, **options)


def _l2(model: nn.Module, lam: float) -> torch.Tensor:
    return lam * sum(m.weight.square().sum() for m in model.modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d)))


# -- pruning and measurements ----------------------------------------------------------------

def _dead_column(weight: torch.Tensor, task: str) -> torch.Tensor:
    """The seeds' criterion for a unit whose outgoing weights (a column) are negligible."""
    w = weight.detach().transpose(0, 1).reshape(weight.shape[1], -1)
    if task == "diabetes":  # the TF demo: sum of magnitudes below 1e-3
        return w.abs().sum(dim=1) <= 1e-3
    return (w.abs() < 5e-4).all(dim=1)  # Scardapane's code: every weight rounds to 0.000


@torch.no_grad()
def prune_negligible_(model: nn.Module, task: str) -> nn.Module:
    """Zeroes the outgoing weights of every unit that the seeds' criterion counts as dead."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            dead = _dead_column(m.weight, task)
            m.weight[:, dead] = 0
    return model


@dataclasses.dataclass
class Result:
    """What one run measured on the test set, for the table."""

    method: Method
    epochs: int
    seconds: float
    zeros: str                   # "exact" or the criterion used to prune
    metric_dense: float          # accuracy, or R^2, of the model as trained
    metric: float                # of the model evaluated and compacted (pruned if "zeros" says)
    mse: float | None            # regression: test MSE in the target's units
    units: list[tuple[int, int]]  # (kept, total) per layer input: features, hidden, ...
    weights_kept: tuple[int, int]  # nonzero weights of the compacted model, of the dense one
    params: tuple[int, int]      # parameters of the compacted model, of the dense one
    max_diff: float              # largest |output difference| compacted vs evaluated model
    same_predictions: bool       # classes (or values within 1e-4 of the scale) agree
    history: SparsityHistory | None = None
    kept_inputs: torch.Tensor | None = None
    kinds: tuple[str, ...] = ()  # coupled tasks: the kind of each entry of ``units``
    flops: tuple[int, int] | None = None         # compacted, dense (torch.utils.flop_counter)
    latency_ms: tuple[float, float] | None = None  # compacted, dense (median, this machine)
    target_reached: object = None  # a target's fraction left per pool at its by_step
    inits: tuple[float, ...] = ()  # a from-scratch row: the metric of each initialization

    @property
    def metric_name(self) -> str:
        return "R2" if self.method.task == "diabetes" else "accuracy"


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _metric(task: str, out: torch.Tensor, y: torch.Tensor) -> float:
    if task == "diabetes":
        return float(1 - ((out - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return float((out.argmax(dim=1) == y).float().mean())


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label:34} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} {elapsed:5.1f}s {note}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# -- one run ---------------------------------------------------------------------------------

def run(method: Method, split: data.Split, epochs: int, *, record_every: int = 10,
        seed: int = 0, device="cpu", progress: bool = True, scratch: Result | None = None
        ) -> Result:
    """Trains one model with ``method`` and measures it (see ``Result``); with ``scratch``
    (the result of ``method.scratch_of``), a model of that result's compacted widths on its
    input features."""
    if method.task in COUPLED_TASKS:
        return _run_coupled(method, split, epochs, record_every=record_every, seed=seed,
                            device=device, progress=progress)
    device = torch.device(device)
    torch.manual_seed(seed)
    if scratch is not None:
        kept = scratch.kept_inputs.to(split.x_train.device)
        split = data.Split(split.x_train[:, kept], split.y_train, split.x_test[:, kept],
                           split.y_test, split.y_scale)
        model = narrow_mlp([k for k, _ in scratch.units])
    else:
        model = MODELS[method.task]()
    task = method.task
    gates = None
    if method.update == "l0":
        model = l0mod.add_l0_gates(model)
        gates = l0mod.L0Regularizer(model, method.lam, train_size=len(split.x_train))
    model = model.to(device)
    opt = _optimizer(method, model)
    steps = -(-len(split.x_train) // (BATCH[task] or len(split.x_train))) * epochs
    reg = _regularizer(method, model, steps)
    if method.update == "prox":
        reg.attach(opt, prox=method.prox)
    elif gates is not None:
        gates.attach(opt)
    loss_fn = nn.MSELoss() if task == "diabetes" else nn.CrossEntropyLoss()

    # the units alive are followed on a pruned shadow of the model when the method leaves no
    # exact zeros, so that the curves show what the final table counts
    exact = method.update != "penalty"
    shadow = model if exact else copy.deepcopy(model)
    example = split.x_test[:1]
    history = SparsityHistory(shadow, reg if exact else None, example_input=example)

    def record(epoch: int) -> None:
        if not exact:
            shadow.load_state_dict(model.state_dict())
            prune_negligible_(shadow, task)
        history.record(epoch)

    n = len(split.x_train)
    batch = BATCH[task] or n
    generator = torch.Generator().manual_seed(seed)
    bar = Progress(f"{task}: {method.label}", epochs) if progress else None
    start = time.perf_counter()
    record(0)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss = loss_fn(model(split.x_train[idx]), split.y_train[idx])
            if method.update == "penalty":
                loss = loss + (_l2(model, method.lam) if method.preset == "l2"
                               else reg.penalty())
            elif gates is not None:
                loss = loss + gates.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % record_every == 0 or epoch == epochs:
            record(epoch)
        if bar is not None and (epoch % max(1, epochs // 100) == 0 or epoch == epochs):
            bar.update(epoch)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    out_dense = _outputs(model, split.x_test)
    final = model if exact else prune_negligible_(copy.deepcopy(model), task)
    out = _outputs(final, split.x_test)
    small = compact(final)
    x_small = split.x_test.flatten(1)[:, small.kept_inputs] if task != "cnn" \
        else split.x_test[:, small.kept_inputs]
    out_small = _outputs(small.model, x_small)
    diff = float((out_small - out).abs().max()) if out.numel() else 0.0
    if task == "diabetes":
        same = diff <= 1e-4 * max(1.0, float(out.abs().max()))
    else:
        same = bool((out_small.argmax(dim=1) == out.argmax(dim=1)).all())
    stats = sparsity_stats(final, None, example_input=example)
    kept_weights = sum(int((m.weight != 0).sum()) for m in small.model.modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d)))
    units = [(stats.layers[0].inputs_kept, stats.layers[0].inputs_total)]
    for layer in stats.layers[:-1]:
        units.append((layer.outputs_kept, layer.outputs_total))
    dense_params = sum(p.numel() for p in MODELS[task]().parameters())
    mse = None
    if task == "diabetes":
        mse = float(((out - split.y_test) ** 2).mean()) * split.y_scale ** 2
    return Result(
        method=method, epochs=epochs, seconds=seconds,
        zeros="exact" if exact else ("L1 ≤ 1e-3" if task == "diabetes" else "rounded, 3 dec."),
        metric_dense=_metric(task, out_dense, split.y_test),
        metric=_metric(task, out, split.y_test), mse=mse, units=units,
        weights_kept=(kept_weights, stats.numel),
        params=(sum(p.numel() for p in small.model.parameters()), dense_params),
        max_diff=diff, same_predictions=same, history=history,
        kept_inputs=small.kept_inputs.cpu(),
        target_reached=None if reg is None or reg.controller is None else reg.controller.reached)


class _UnitsHistory:
    """Units alive per kind (channels, heads, neurons) over the epochs: what ``plot_run`` draws
    for the coupled tasks."""

    def __init__(self, found):
        self.found, self.steps, self.units = found, [], {}

    def record(self, step: int) -> None:
        self.steps.append(step)
        for kind, (alive, _) in coupled_stats(self.found).units().items():
            self.units.setdefault(kind, []).append(alive)


def _run_coupled(method: Method, split: data.Split, epochs: int, *, record_every: int,
                 seed: int, device, progress: bool) -> Result:
    """A coupled task: training (the proximal step on the coupled groups, or none), then
    compaction through the groups, with FLOPs and latency of both models."""
    device = torch.device(device)
    torch.manual_seed(seed)
    task = method.task
    model = MODELS[task]().to(device)
    example = split.x_test[:1]
    opt = torch.optim.SGD(model.parameters(), lr=method.lr, momentum=0.9)
    reg = None
    if method.update == "prox":
        reg = Regularizer(model, method.preset, method.lam, example_inputs=example,
                          **method.options)
        reg.attach(opt)
        found = reg.found
    else:
        found = groups_mod.discover(model, COUPLED_TASKS[task], example_inputs=example)
    history = _UnitsHistory(found)
    n, batch = len(split.x_train), BATCH[task]
    generator = torch.Generator().manual_seed(seed)
    bar = Progress(f"{task}: {method.label}", epochs) if progress else None
    start = time.perf_counter()
    history.record(0)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % record_every == 0 or epoch == epochs:
            history.record(epoch)
        if bar is not None:
            bar.update(epoch)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    # BatchNorm's running statistics lag behind filters the step keeps shrinking: recomputed on
    # the training set (every run, so the baseline is treated alike)
    recalibrate_batchnorm(model, (split.x_train[i:i + batch] for i in range(0, n, batch)))
    out = _outputs(model, split.x_test)
    small = compact(model, found)
    out_small = _outputs(small.model, split.x_test)
    stats = coupled_stats(found, model, small, example_inputs=split.x_test, repeats=20)
    units = stats.units()
    kinds = tuple(units)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return Result(
        method=method, epochs=epochs, seconds=seconds, zeros="exact",
        metric_dense=_metric(task, out, split.y_test),
        metric=_metric(task, out_small, split.y_test), mse=None,
        units=[units[k] for k in kinds], weights_kept=(nonzero, stats.params_dense),
        params=(stats.params_compact, stats.params_dense),
        max_diff=float((out_small - out).abs().max()),
        same_predictions=bool((out_small.argmax(dim=1) == out.argmax(dim=1)).all()),
        history=history, kinds=kinds, flops=(stats.flops_compact, stats.flops_dense),
        latency_ms=(stats.latency_compact_ms, stats.latency_dense_ms))


def load(task: str, seed: int = 0, validation: bool = False) -> data.Split:
    if task == "diabetes":
        return data.diabetes(seed, validation)
    return data.digits(seed, images=task != "digits", validation=validation)


def run_all(methods: list[str], schedule: Schedule, *, seed: int = 0, device="cpu",
            validation: bool = False, progress: bool = True, log=print) -> list[Result]:
    """Runs the named methods, in the order of ``METHODS``."""
    results = []
    splits = {}
    # a from-scratch run needs the run whose widths it takes
    methods = set(methods) | {m.scratch_of for m in METHODS if m.name in methods and m.scratch_of}
    for method in (m for m in METHODS if m.name in methods):
        if method.task not in splits:
            splits[method.task] = load(method.task, seed, validation).to(device)
        scratch = next(r for r in results if r.method.name == method.scratch_of) \
            if method.scratch_of else None
        # small models vary with their init: a from-scratch row takes three, the median's
        runs = [run(method, splits[method.task], schedule.epochs(method.task),
                    record_every=schedule.record_every, seed=seed + k, device=device,
                    progress=progress, scratch=scratch)
                for k in range(3 if scratch is not None else 1)]
        result = runs[0]
        if scratch is not None:
            runs.sort(key=lambda r: r.metric)
            result = dataclasses.replace(runs[1], inits=tuple(r.metric for r in runs))
        log(f"{method.task:8} {method.label:30} {result.metric_name} {result.metric:.4f}  "
            f"units {'-'.join(str(k) for k, _ in result.units)}  ({result.seconds:.1f} s)")
        results.append(result)
    return results


__all__ = ["Method", "METHODS", "METHOD_NAMES", "TASKS", "SCHEDULES", "Schedule", "Result",
           "run", "run_all", "load", "prune_negligible_"]
