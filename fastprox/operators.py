"""The operator table: every fastprox operator declared once, as a row.

A row gives the operator's name, its thresholds (and which of the fused step's three columns
each one sets), its flags, its formula (the heart of its docstring), its reference
(fastprox/reference.py) and sample thresholds. Everything else is generated from the rows:

* the docstrings of the public functions (fastprox/ops.py, where each is written out, its
  signature held to its row by tests/test_structure.py);
* the fake implementations, opcheck and torch.compile cases (fastprox/_registry.py, tests/);
* the test parametrization on the CPU, under Triton's interpreter and on CUDA (tests/helpers.py,
  tests_kernels/);
* the benchmark rows (bench/harness.py).

The library has two kernels per device: ``group_norms`` and the fused in-place step
``foreach_prox_`` (per tensor: soft threshold by ``lam_l1``, group shrink by ``lam_group``,
exclusive shrink by ``lam_exclusive``). Every in-place operator is a *preset* of the fused step:
its thresholds fill some of the three columns, the others stay 0. The math contract of every
row is docs/SPEC.md.

Adding an operator: a row here, its function in fastprox/ops.py (a preset: its checks and its
columns of the fused step), its reference in fastprox/reference.py and, if its per-group math
is new, that math in each engine (``ProxStep`` in csrc/cpu/group_steps.h, ``_group_params`` in
kernels/prox_kernels.py) and a column of the fused step.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

COLUMNS = ("lam_l1", "lam_group", "lam_exclusive")  # the fused step's thresholds, in order
FLAGS = ("size_weighted", "exact")  # the fused step's per-tensor flags, in order

DIM_DOC = """\
    dim: the dimensions reduced inside a group, an int or a tuple (negative allowed), exactly as
        in ``torch.linalg.vector_norm``; the remaining dimensions index the groups. ``None``
        (default): every dimension but the first. For an ``nn.Linear`` weight ``(out, in)``:
        ``dim=1`` (default) makes a group of each row (an output unit), ``dim=0`` of each column
        (an input feature). For a conv weight ``(O, I, kh, kw)``: ``(1, 2, 3)`` (default) groups
        each filter (output channel), ``(0, 2, 3)`` each input channel, ``0`` each input
        position across all filters (CGES). An empty tuple makes every element its own group."""

EDGES_DOC = """\
    Edge cases: every ``lam`` = 0 leaves ``weight`` bit-identical; a group containing NaN
    becomes all NaN; a group of infinite norm keeps its values; a zero group stays zero (never
    NaN). Sums are accumulated in float32 for float16/bfloat16, in the weight's type otherwise.
    Thresholds are Python numbers or 0-d tensors (a tensor does not recompile under
    ``torch.compile`` when its value changes); negative, NaN or infinite ones raise ValueError
    before the weight is touched. Works in place on any strided view (``w.t()``, ``w[:, ::2]``)."""


@dataclasses.dataclass(frozen=True)
class Operator:
    """One row of the table.

    kind: ``"preset"`` (an in-place operator, a preset of the fused step), ``"fused"`` (the
    fused step itself, on a list of tensors), ``"norms"`` (group_norms) or ``"coupled"`` (the
    fused step over groups that span several tensors, fastprox/coupled.py: it runs in phases on
    the ops of the other rows).
    thresholds: (argument name, column of the fused step) per threshold, in argument order.
    flags: keyword-only bool arguments (default True), each a per-tensor flag of the fused step.
    reference: the name of its function in fastprox/reference.py (``oracle``: the function).
    grouped: takes ``dim``. doc: the docstring; ``{dim}`` and ``{edges}`` expand to the shared
    paragraphs. samples: typical (thresholds, flags) for small N(0, 1) weights, the test cases.
    bench: the (thresholds, flags) timed by the benchmarks (bench/harness.py) on large N(0, 1)
    weights: each removes a visible share of the groups or values without emptying the weight.
    """

    name: str
    kind: str
    thresholds: tuple[tuple[str, str], ...]
    flags: tuple[str, ...]
    grouped: bool
    doc: str
    reference: str
    samples: tuple[tuple[tuple[float, ...], dict], ...]
    bench: tuple[tuple[tuple[float, ...], dict], ...] = ()

    @property
    def oracle(self) -> Callable:
        """The row's reference function (fastprox/reference.py), looked up by name: the tests
        call it; no module of the library runs it."""
        return getattr(importlib.import_module("fastprox.reference"), self.reference)

    @property
    def docstring(self) -> str:
        return self.doc.format(dim=DIM_DOC, edges=EDGES_DOC)

    @property
    def threshold_names(self) -> tuple[str, ...]:
        return tuple(arg for arg, _ in self.thresholds)

    def columns(self, values) -> dict[str, object]:
        """The fused step's thresholds (by column) that these threshold values set."""
        return {column: v for (_, column), v in zip(self.thresholds, values)}

    def newton(self, flags: dict) -> bool:
        """Whether a call with these flags iterates the exact exclusive threshold."""
        return any(c == "lam_exclusive" for _, c in self.thresholds) and flags.get("exact", True)

    def lam_names(self) -> list[str]:
        """The name of each column of the fused step in this operator's errors ('' for a column
        it never sets: the kernels skip that sub-step without reading it)."""
        named = {column: arg for arg, column in self.thresholds}
        return [named.get(column, "") for column in COLUMNS]


OPERATORS = [
    Operator(
        name="group_norms", kind="norms", thresholds=(), flags=(), grouped=True,
        reference="group_norms", samples=(((), {}),), bench=(((), {}),),
        doc="""Per-group Euclidean norms ``||W_g||_2``.

    Returns a new tensor shaped like the kept dimensions of ``weight`` (those not in ``dim``),
    of ``weight``'s dtype. Differentiable: the gradient at a zero group is 0 (never NaN).

{dim}

    Example::

        >>> w = torch.randn(128, 64)          # nn.Linear(64, 128).weight
        >>> fastprox.group_norms(w).shape      # one norm per output unit (row)
        torch.Size([128])
        >>> fastprox.group_norms(w, dim=0).shape   # one per input feature (column)
        torch.Size([64])
"""),
    Operator(
        name="group_shrink_", kind="preset", thresholds=(("lam", "lam_group"),),
        flags=("size_weighted",), grouped=True, reference="group_shrink_",
        samples=(((0.3,), {}), ((0.9,), {"size_weighted": False})), bench=(((0.02,), {}),),
        doc="""Group lasso prox, in place: ``Omega(W) = lam * sum_g c ||W_g||_2``.

    With ``t = lam * c`` (``c = sqrt(n)`` when ``size_weighted``, else 1; ``n`` = elements per
    group)::

        W_g <- s_g * W_g,   s_g = 0 if ||W_g|| <= t  else  1 - t / ||W_g||

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.group_shrink_(layer.weight, lr * lam, dim=0)``
    after ``optimizer.step()`` removes whole input features.
"""),
    Operator(
        name="soft_threshold_", kind="preset", thresholds=(("lam", "lam_l1"),), flags=(),
        grouped=False, reference="soft_threshold_", samples=(((0.5,), {}),),
        bench=(((0.5,), {}),),
        doc="""Lasso prox (soft threshold), in place: ``Omega(W) = lam * ||W||_1``::

        w <- sign(w) * max(|w| - lam, 0)     elementwise

    NaN stays NaN and +-inf stays +-inf; ``lam`` = 0 leaves ``weight`` bit-identical. ``lam`` is
    a Python number or a 0-d tensor, finite and >= 0. Works in place on any strided view.

    Returns ``weight``. Example: ``fastprox.soft_threshold_(w, 1e-3)``.
"""),
    Operator(
        name="sparse_group_shrink_", kind="preset",
        thresholds=(("lam_l1", "lam_l1"), ("lam_group", "lam_group")), flags=("size_weighted",),
        grouped=True, reference="sparse_group_shrink_", samples=(((0.2, 0.15), {}),),
        bench=(((0.1, 0.02), {}),),
        doc="""Sparse group lasso prox, in place:
    ``Omega(W) = lam_l1 * ||W||_1 + lam_group * sum_g c ||W_g||_2``.

    Its exact prox is the composition (Friedman, Hastie, Tibshirani 2010), fused in one pass::

        V   <- sign(W) * max(|W| - lam_l1, 0)
        W_g <- s_g * V_g,   s_g = 0 if ||V_g|| <= t  else  1 - t / ||V_g||,   t = lam_group * c

    with ``c = sqrt(n)`` when ``size_weighted``, else 1.

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.sparse_group_shrink_(w, 1e-4, 1e-3, dim=0)``.
"""),
    Operator(
        name="exclusive_shrink_", kind="preset", thresholds=(("lam", "lam_exclusive"),),
        flags=("exact",), grouped=True, reference="exclusive_shrink_",
        samples=(((0.1,), {}), ((0.02,), {"exact": False})),
        bench=(((1e-3,), {}), ((1e-5,), {"exact": False})),
        doc="""Exclusive lasso prox, in place: ``Omega(W) = (lam / 2) * sum_g ||W_g||_1 ** 2``.

    Sparsity *within* each group (the groups compete for nonzeros). Per group, ``a = |W_g|``::

        W_g <- sign(W_g) * max(a - tau, 0)

    ``exact=True``: ``tau`` solves ``tau = lam * sum_i max(a_i - tau, 0)``, i.e.
    ``tau = max_k lam * S_k / (1 + lam * k)`` with ``S_k`` the sum of the ``k`` largest ``a`` —
    found without sorting (Newton's method from 0, exact in a handful of steps).
    ``exact=False``: CGES's published update ``tau = lam * ||W_g||_1``, an upper bound that always
    over-shrinks; only for reproducing CGES.

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.exclusive_shrink_(w, 1e-2, dim=0)``.
"""),
    Operator(
        name="cges_shrink_", kind="preset",
        thresholds=(("lam_group", "lam_group"), ("lam_exclusive", "lam_exclusive")),
        flags=("size_weighted", "exact"), grouped=True, reference="cges_shrink_",
        samples=(((0.1, 0.05), {}), ((0.5, 0.02), {"size_weighted": False, "exact": False})),
        bench=(((0.02, 1e-3), {}),),
        doc="""CGES step (Yoon & Hwang 2017), in place: group shrink, then exclusive shrink of the
    result, fused into one pass::

        W <- exclusive_shrink_(group_shrink_(W, lam_group, dim, size_weighted=size_weighted),
                               lam_exclusive, dim, exact=exact)

    ``size_weighted=False, exact=False`` is the published update (with ``dim=0``: groups are the
    outgoing weights of an input unit / input position).

{dim}

{edges}

    Returns ``weight``. Example: ``fastprox.cges_shrink_(w, 1e-3, 1e-4, dim=0)``.
"""),
    Operator(
        name="coupled_prox_", kind="coupled",
        thresholds=tuple((c, c) for c in COLUMNS), flags=FLAGS, grouped=False,
        reference="coupled_prox_",
        samples=(((0.1, 0.2, 0.05), {}), ((0.0, 0.3, 0.0), {"size_weighted": False}),
                 ((0.0, 0.0, 0.02), {"exact": False}), ((0.0, 0.1, 0.05), {})),
        doc="""The proximal step of coupled groups: groups that span slices of several tensors.

    ``groups`` is a ``fastprox.CoupledGroups`` (or a list of them): members
    ``Slice(tensor, axis, index)``, position ``i`` along ``axis`` of ``tensor`` (a row, a column,
    a channel, a bias entry) belonging to group ``index[i]``. Group ``g`` is the union of its
    slices, ``n_g`` its element count. The fused step of ``foreach_prox_`` over those groups::

        W <- soft_threshold(W, lam_l1)                          (elementwise)
        W_g <- s_g W_g,  s_g = max(1 - lam_group c_g / ||W_g||, 0),  c_g = sqrt(n_g) or 1
        W_g <- sign(W_g) max(|W_g| - tau_g, 0)                  (exclusive, tau_g over the union)

    so every slice of a group gets the same scale and the same exclusive threshold. Norms and
    sums of a group add its members' parts in a fixed order: the result is bitwise the same from
    run to run and for any thread count. The sums of every member and the rewrite of every
    member are one call each of the fused phase ops (``foreach_group_sums``,
    ``foreach_group_rewrite_``), and so is each Newton step of the exact exclusive threshold
    (``foreach_group_sums_above``): C++ on the CPU, Triton on CUDA, C++ on a host copy elsewhere.

    Args:
        groups: a ``CoupledGroups`` or a list of them (built and checked by ``CoupledGroups``:
            ranges, sizes and overlaps are refused there, before anything is written). A list
            is each set's step in turn, in its order (sets may share tensors: a conv's output
            channels in one set, its input channels in another); sets that share no memory run
            together, in the same fused calls.
        lam_l1, lam_group, lam_exclusive: numbers or 0-d tensors, finite and >= 0 (read on the
            host).
        size_weighted: ``c_g = sqrt(n_g)`` (True) or 1.
        exact: the exact exclusive threshold (True) or CGES's bound.
        max_newton_steps: bound on the exact threshold's Newton steps (a warning if reached).

    Edge cases as ``foreach_prox_``'s, per coupled group: every ``lam`` = 0 leaves every member
    bit-identical; a group containing NaN becomes all NaN; a group of infinite norm keeps its
    values; a zero group stays zero (never NaN). Members are written in place (views too).

    Returns ``groups``. Example::

        sets = fastprox.groups.channels(model, example_inputs)
        fastprox.coupled_prox_(sets, lam_group=lr * lam)
"""),
    Operator(
        name="foreach_prox_", kind="fused",
        thresholds=tuple((c, c) for c in COLUMNS), flags=FLAGS, grouped=True,
        reference="foreach_prox_",
        samples=(((0.1, 0.2, 0.05), {}), ((0.0, 0.3, 0.0), {"size_weighted": False}),
                 ((0.0, 0.0, 0.02), {"exact": False})),
        doc="""One proximal step on every tensor of a list, in one call (one parallel region on
    the CPU, a few launches on a GPU).

    Per tensor ``W`` (with its own thresholds, ``dim``, ``size_weighted`` and ``exact``)::

        W <- soft_threshold(W, lam_l1)                        (skipped when lam_l1 = 0)
        W <- group shrink by lam_group * c over dim's groups  (skipped when lam_group = 0)
        W <- exclusive shrink by lam_exclusive                (skipped when lam_exclusive = 0)

    It is the library's one in-place kernel: ``soft_threshold_``, ``group_shrink_``,
    ``sparse_group_shrink_``, ``exclusive_shrink_`` and ``cges_shrink_`` are presets of it. This
    is the step for a whole model: a call per small tensor costs more than its work.

    Args:
        weights: a list of tensors on one device, no two sharing memory (views of one storage
            whose address ranges interleave, like ``w[:, :3]`` and ``w[:, 3:]``, are refused).
        lam_l1, lam_group, lam_exclusive: a number or 0-d tensor for every tensor, or a list (or
            1-D tensor) with one per tensor; finite and >= 0.
        dim: one ``dim`` for every tensor (None, an int or a tuple), or a **list** with one per
            tensor; as in ``group_shrink_`` (reduced dimensions; None: all but the first).
        size_weighted: ``c = sqrt(n)`` (True) or 1; a bool or a list of bools.
        exact: the exact exclusive threshold (True) or CGES's bound; a bool or a list of bools.

{edges}

    Returns ``weights``. Example::

        fastprox.foreach_prox_([l.weight for l in linears], lam_group=lr * lam, dim=0)
"""),
    Operator(
        name="foreach_metric_prox_", kind="metric",
        thresholds=tuple((c, c) for c in COLUMNS), flags=FLAGS, grouped=True,
        reference="metric_prox_",
        samples=(((0.01, 0.3, 0.0), {}), ((0.0, 0.0, 0.02), {}),
                 ((0.0, 0.3, 0.01), {"exact": False})),
        doc="""The proximal step in an Adam / AdamW step's metric, on every tensor of a list.

    After an Adam step the weight ``z`` is the minimizer of a quadratic model whose metric is
    ``D = diag(d)``, ``d = (sqrt(v_hat) + eps) / lr`` (``v_hat = v / (1 - beta2 ** step)``, the
    bias-corrected second moment ``exp_avg_sq``, or ``max_exp_avg_sq`` under amsgrad). The
    regularized step solves, per tensor::

        x = argmin_x 1/2 (x - z)^T D (x - z) + Omega(x),
        Omega(x) = lam_l1 ||x||_1 + lam_group sum_g c ||x_g||_2 + (lam_exclusive/2) sum_g ||x_g||_1^2

    (``c = sqrt(n)`` or 1), exactly (docs/SPEC.md, "Proximal steps in an optimizer's metric"):
    soft threshold by ``lam_l1 / d_i``; a group is zero iff ``||D z_g|| <= lam_group c`` and
    otherwise ``x_i = z_i d_i / (d_i + lam_group c / theta)``, ``theta = ||x_g||`` the root of a
    monotone scalar equation (Newton); exclusive: threshold ``lam_exclusive S / d_i`` with
    ``S = ||x_g||_1`` (exact) or CGES's bound ``S = ||z_g||_1`` (``exact=False``). The
    thresholds are the penalty's own (not ``lr * lam``): ``lr`` is in ``D``. An element with
    ``d = 0`` becomes 0; with a constant ``d = 1/lr`` this is ``foreach_prox_`` with
    thresholds ``lr * lam``.

    Args:
        weights: a list of tensors on one device, no two sharing memory.
        exp_avg_sqs: the second moment of each (same shapes; any float dtype; finite and >= 0,
            sharing no memory with a weight: checked before anything is written).
        lr, eps, beta2: the step's, a number or 0-d tensor for every tensor or a list with one
            per tensor (lr >= 0, eps >= 0, 0 <= beta2 < 1). At lr = 0 (a warmup's first step)
            the metric is infinite and the step the identity: that tensor is left as it is.
        step: the optimizer's step count (bias correction ``1 - beta2 ** step``), or None
            (no correction: ``exp_avg_sqs`` already is ``v_hat``).
        lam_l1, lam_group, lam_exclusive, dim, size_weighted, exact: as ``foreach_prox_``.

    One read of each weight and second moment and one write of the weight, per group (C++ on
    the CPU, deterministic for any thread count; Triton on CUDA, deterministic; the C++ kernel
    on a host copy on other devices).
    Edge cases as ``foreach_prox_``'s: every ``lam`` = 0 leaves the weights bit-identical; a
    zero group stays zero (never NaN); a NaN group becomes NaN; a group of infinite norm keeps
    its values. Numbers are read on the host. DTensor weights (with DTensor moments): the local
    shards when no group spans shards, else the full tensor, each rank keeping its shard.

    Returns ``weights``. Example (after ``optimizer.step()`` of a ``torch.optim.AdamW``)::

        s = optimizer.state[w]
        fastprox.foreach_metric_prox_([w], [s["exp_avg_sq"]], lr=lr, lam_group=1e-3,
                                      eps=1e-8, beta2=0.999, step=s["step"], dim=0)
"""),
]

BY_NAME = {op.name: op for op in OPERATORS}
PRESETS = [op for op in OPERATORS if op.kind == "preset"]
