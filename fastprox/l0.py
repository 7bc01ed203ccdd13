"""L0 regularization with hard-concrete gates (Louizos, Welling, Kingma 2017; docs/SPEC.md).

Each gate j has a learned ``log_alpha_j``; with beta = 2/3, gamma = -0.1, zeta = 1.1, eps = 1e-6:

    training:  u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
               z = clamp(s (zeta - gamma) + gamma, 0, 1)            (a fresh sample per example)
    test:      z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)
    P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))

The expected-L0 penalty of a layer is  sum_j P(z_j != 0) * sum_{k in g_j} (lam + wd/2 * w_k^2),
divided by the training-set size, g_j being the weights the gate switches off. After each
optimizer step log_alpha is clamped to [ln 0.01, ln 100].

Gates are modules on activations, placed by ``add_l0_gates``: before every Linear (its input
units; g_j = column j of the weight) and after every conv (its output channels, bias included;
g_j = filter j). A unit whose test-time gate is exactly 0 is removed by ``fastprox.compact``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA, GAMMA, ZETA, EPS = 2 / 3, -0.1, 1.1, 1e-6
LOG_ALPHA_RANGE = (math.log(0.01), math.log(100.0))

from ._compiled import outside_graph as _outside_graph
from ._modules import CONV as _CONV, flatten


class L0Gate(nn.Module):
    """Hard-concrete gates on the ``features`` units of dimension 1 of its input.

    Args:
        features: number of gates.
        droprate_init: p of the initialisation log_alpha ~ N(log((1 - p) / p), 0.01).
        layer: the Linear (gate in front of it) or conv (gate after it) whose weights the gates
            switch off; used by the penalty.
    """

    def __init__(self, features: int, droprate_init: float = 0.5, layer: nn.Module | None = None):
        super().__init__()
        if not 0 < droprate_init < 1:
            raise ValueError(f"L0Gate: droprate_init must be in (0, 1), got {droprate_init}")
        self.features = features
        self.log_alpha = nn.Parameter(
            torch.empty(features).normal_(math.log((1 - droprate_init) / droprate_init), 0.01))
        # A plain attribute, not a submodule: the layer stays owned by the model.
        self.__dict__["layer"] = layer

    def extra_repr(self) -> str:
        return f"features={self.features}"

    def prob_nonzero(self) -> torch.Tensor:
        """P(z_j != 0) per gate."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))

    def test_gates(self, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The deterministic gates used at test time (of ``log_alpha``: a copy of it)."""
        log_alpha = self.log_alpha if log_alpha is None else log_alpha
        return torch.clamp(torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def sample_gates(self, batch: int) -> torch.Tensor:
        """(batch, features) training gates, one sample per example."""
        u = torch.empty(batch, self.features, device=self.log_alpha.device,
                        dtype=self.log_alpha.dtype).uniform_(EPS, 1 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.features:
            raise ValueError(f"L0Gate: expected {self.features} units in dimension 1, got shape "
                             f"{tuple(x.shape)}")
        z = self.sample_gates(x.shape[0]) if self.training else self.test_gates().expand(
            x.shape[0], -1)
        return x * z.reshape(*z.shape, *([1] * (x.dim() - 2))).to(x.dtype)

    def group_weights(self) -> torch.Tensor:
        """(features, n) the weights each gate switches off (g_j of the penalty)."""
        w = self.layer.weight
        if isinstance(self.layer, nn.Linear):
            return w.t()
        return w.reshape(w.shape[0], -1)

    def penalty(self, lam: float, weight_decay: float = 0.0) -> torch.Tensor:
        """sum_j P(z_j != 0) * sum_{k in g_j} (lam + weight_decay / 2 * w_k^2) (undivided)."""
        g = self.group_weights()
        per_gate = lam * g.shape[1] + 0.5 * weight_decay * (g * g).sum(dim=1)
        return (self.prob_nonzero() * per_gate).sum()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)

    def sliced(self, keep: torch.Tensor) -> "L0Gate":
        """A gate module of the kept units only (used by compaction)."""
        new = L0Gate(len(keep))
        new.log_alpha = nn.Parameter(self.log_alpha.detach()[keep.to(self.log_alpha.device)].clone())
        new.train(self.training)
        return new


def add_l0_gates(model: nn.Sequential, droprate_init: float = 0.5,
                 input_droprate_init: float = 0.2) -> nn.Sequential:
    """A copy-free rebuild of ``model`` (an ``nn.Sequential``, nested ones flattened) with an
    ``L0Gate`` before every Linear and after every conv, as in the paper (dense layers gate
    their inputs, conv layers their output channels). The first layer's gates, on the model's
    inputs, start at ``input_droprate_init`` (0.2 for an MLP's input layer in the paper).
    The layers themselves are shared with ``model``, not copied."""
    if not isinstance(model, nn.Sequential):
        raise TypeError("add_l0_gates: model must be an nn.Sequential")
    modules = []
    first = True
    for _, m in flatten(model):
        if isinstance(m, nn.Linear):
            p = input_droprate_init if first else droprate_init
            modules.append(L0Gate(m.in_features, p, layer=m))
            modules.append(m)
            first = False
        elif isinstance(m, _CONV):
            modules.append(m)
            modules.append(L0Gate(m.out_channels, droprate_init, layer=m))
            first = False
        else:
            modules.append(m)
    return nn.Sequential(*modules)


class L0Regularizer:
    """The expected-L0 penalty and log_alpha clamping of every ``L0Gate`` of a model.

    Example::

        model = fastprox.l0.add_l0_gates(model)
        l0 = fastprox.l0.L0Regularizer(model, lam=0.1, train_size=len(dataset))
        l0.attach(optimizer)                  # clamps log_alpha after every step
        loss = criterion(model(x), y) + l0.penalty()
    """

    def __init__(self, model: nn.Module, lam: float, train_size: int, weight_decay: float = 0.0,
                 target=None):
        self.gates = [m for m in model.modules() if isinstance(m, L0Gate)]
        if not self.gates:
            raise ValueError("L0Regularizer: the model has no L0Gate (see add_l0_gates)")
        missing = [g for g in self.gates if g.layer is None]
        if missing:
            raise ValueError("L0Regularizer: every L0Gate needs the layer it gates (layer=...)")
        if train_size <= 0:
            raise ValueError(f"L0Regularizer: train_size must be > 0, got {train_size}")
        self.lam, self.train_size, self.weight_decay = lam, train_size, weight_decay
        self.scales = [1.0] * len(self.gates)  # per gate module: its lam is lam * scale
        self.controller = None
        if target is not None:
            self.controller = self._controller(model, target)
            self.controller.before_step()

    def _controller(self, model, target):
        from . import target as _target

        if not isinstance(target, _target.SparsityTarget):
            raise TypeError(f"L0Regularizer: target must be a fastprox.SparsityTarget, got "
                            f"{type(target).__name__}")
        names = {id(m): n for n, m in model.named_modules()}
        layers = []
        for i, g in enumerate(self.gates):
            name = names.get(id(g), str(i))
            if target.layers is not None and name not in target.layers:
                continue
            layers.append(_gate_layer(self, i, name))
        if target.layers is not None and len(layers) != len(target.layers):
            raise ValueError(f"L0Regularizer: target.layers names gates that are not in the "
                             f"model: {target.layers} (gates: "
                             f"{[names.get(id(g)) for g in self.gates]})")
        if target.measure != "units":
            raise ValueError("L0Regularizer: a target on L0 gates counts units (open gates); "
                             f"measure={target.measure!r} is counted on zero weights, which gates "
                             "do not make")
        return _target.Controller(target, layers)

    def penalty(self) -> torch.Tensor:
        total = sum(g.penalty(self.lam * s, self.weight_decay)
                    for g, s in zip(self.gates, self.scales))
        return total / self.train_size

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates."""
        return sum(g.prob_nonzero().sum() for g in self.gates)

    def clamp_(self) -> None:
        for g in self.gates:
            g.clamp_()

    def attach(self, optimizer: torch.optim.Optimizer):
        """After every step: clamps log_alpha, then (with a target) the controller's step."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def step(self) -> None:
        """Clamps log_alpha, then takes the controller's step. Under torch.compile the clamp is
        traced; a controller ranks the gates on the host, outside the graph (one break)."""
        if self.controller is not None and torch.compiler.is_compiling():
            _step_outside_graph(self)
        else:
            _step(self)

    def units_alive(self) -> list[int]:
        """Per gate module, the number of gates open at test time."""
        return [int((g.test_gates() > 0).sum()) for g in self.gates]


def _step(reg: L0Regularizer) -> None:
    reg.clamp_()
    if reg.controller is not None:
        reg.controller.after_step()
        # the gates' state after this step: what the budget of the next one goes back to
        reg.controller.before_step()


# called only under torch.compile: the graph breaks once, here, and the step runs eagerly
_step_outside_graph = _outside_graph(_step)


def _gate_layer(reg: L0Regularizer, i: int, name: str):
    """A gate module as a layer of a sparsity target's controller (kind ``gates``): a unit is
    alive while its test-time gate is open, its strength is its log_alpha; removing it closes
    the gate (log_alpha at its minimum); a copy is of log_alpha."""
    from .target import Layer

    gate = reg.gates[i]

    def measured(log_alpha):
        alive = (gate.test_gates(log_alpha) > 0).detach().cpu().reshape(-1)
        return alive, log_alpha.detach().to("cpu", torch.float64).reshape(-1)

    def remove(mask):
        with torch.no_grad():
            gate.log_alpha[mask.to(gate.log_alpha.device)] = LOG_ALPHA_RANGE[0]

    def scale(s):
        reg.scales[i] = s

    def restore(state, mask):
        with torch.no_grad():
            back = mask.to(gate.log_alpha.device)
            gate.log_alpha[back] = state[back]

    return Layer(name, "gates", gate.log_alpha.numel(), lambda: measured(gate.log_alpha),
                 remove, scale, lambda: gate.log_alpha.detach().clone(), restore, measured)
