"""Pure-PyTorch reference of every fastprox operator: the oracle of the tests.

Written to mirror the formulas of docs/SPEC.md, not to be fast. Same signatures and the same
in-place semantics as the public operators (``fastprox.ops``); correct in float64 (the tests run
it on a float64 copy), and it runs in the weight's own dtype otherwise.

Nothing in the library runs it. Its per-group rules (``group_scale``, ``cges_bound``,
``newton_tau``, ``exclusive_tau``) are stated here on their own, apart from the library's
(fastprox/_rules.py), so that the tests check those too. The ``*_op`` functions and
``fused_step`` take the ops' own arguments (schemas: csrc/fastprox.cpp): the tests compare each
backend with them, and run the public API on them (fastprox/_registry.py ``serve``).
"""

from __future__ import annotations

import math

import torch

from ._checks import normalize_dim, shares_memory


def _value(lam) -> float:
    return float(lam)


def _reduced(weight: torch.Tensor, dim) -> list[int]:
    return normalize_dim(dim, weight, "reference")


def _group_size(weight: torch.Tensor, dims: list[int]) -> int:
    return math.prod(weight.shape[d] for d in dims)


def _as_groups(weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """A (num_groups, n) copy: kept dimensions first, each row one group."""
    kept = [d for d in range(weight.dim()) if d not in dims]
    return weight.permute(kept + dims).reshape(-1, _group_size(weight, dims))


def _from_groups(weight: torch.Tensor, dims: list[int], rows: torch.Tensor) -> torch.Tensor:
    """Writes (num_groups, n) rows back into weight (the inverse of _as_groups)."""
    kept = [d for d in range(weight.dim()) if d not in dims]
    weight.permute(kept + dims).copy_(rows.reshape([weight.shape[d] for d in kept + dims]))
    return weight


def group_norms(weight: torch.Tensor, dim=None) -> torch.Tensor:
    """||W_g||_2 per group, shaped like the kept dimensions."""
    dims = _reduced(weight, dim)
    if not dims:
        return weight.abs()
    return torch.linalg.vector_norm(weight, 2, dim=dims)


def group_scale(norms: torch.Tensor, t: float) -> torch.Tensor:
    """s = max(1 - t/||W_g||, 0), with the edge rules: a NaN norm gives NaN, an infinite one 1
    (also when t overflows the norms' dtype), a zero group 0 (t/0 is inf: 1 - inf clamps to 0)."""
    return (1 - t / norms).clamp(min=0).masked_fill(norms.isinf(), 1.0)


def cges_bound(l1: torch.Tensor, lam: float) -> torch.Tensor:
    """CGES's exclusive threshold lam * ||W_g||_1; a zero group gets 0 (also for lam = inf)."""
    return (lam * l1).masked_fill(l1 == 0, 0.0)


def newton_tau(total: torch.Tensor, count: torch.Tensor, lam: float) -> torch.Tensor:
    """lam S / (1 + lam k) for the sum S of the k magnitudes above tau, 0 when k = 0: as
    S / (1/lam + k), so that a lam beyond the dtype's range still gives S / k."""
    return (total / (1 / lam + count)).masked_fill(count == 0, 0.0)


def exclusive_tau(tau: torch.Tensor, l1: torch.Tensor, scale) -> torch.Tensor:
    """A group's exclusive threshold after the edge rules: NaN for a NaN group; 0 for an
    infinite group (it keeps its values) and for one the group step zeroed (it stays zero)."""
    tau = tau.masked_fill(l1.isinf() | (scale == 0), 0.0)
    return tau.masked_fill(l1.isnan(), math.nan)


def group_shrink_(weight, lam, dim=None, *, size_weighted=True):
    """W_g <- s_g W_g,  s_g = max(1 - t/||W_g||, 0) with t = lam * (sqrt(n) if size_weighted)."""
    lam = _value(lam)
    if lam == 0 or weight.numel() == 0:
        return weight
    dims = _reduced(weight, dim)
    c = math.sqrt(_group_size(weight, dims)) if size_weighted else 1.0
    norms = torch.linalg.vector_norm(weight, 2, dim=dims, keepdim=True) if dims else weight.abs()
    return weight.mul_(group_scale(norms, lam * c))


def shrink_magnitude(y: torch.Tensor, tau, out: torch.Tensor | None = None) -> torch.Tensor:
    """sign(y) max(|y| - tau, 0), into ``out`` if given. NaN in y or tau stays NaN (copysign,
    not sign(): torch.sign(nan) is 0; clamp propagates NaN). A number tau beyond y's dtype is
    its largest value (an infinite y minus it stays infinite, as with the real tau)."""
    if isinstance(tau, float) and y.is_floating_point():
        tau = min(tau, torch.finfo(y.dtype).max)
    return torch.copysign(torch.clamp(y.abs() - tau, min=0), y, out=out)


def soft_threshold_(weight, lam):
    """w <- sign(w) max(|w| - lam, 0)."""
    lam = _value(lam)
    if lam == 0:
        return weight
    return weight.copy_(shrink_magnitude(weight, lam))


def sparse_group_shrink_(weight, lam_l1, lam_group, dim=None, *, size_weighted=True):
    """Soft threshold by lam_l1, then group shrink of the result by lam_group."""
    if _value(lam_l1) == 0 and _value(lam_group) == 0:
        return weight
    soft_threshold_(weight, lam_l1)
    return group_shrink_(weight, lam_group, dim, size_weighted=size_weighted)


def exclusive_threshold(a: torch.Tensor, lam: float, exact: bool = True) -> torch.Tensor:
    """tau per row of a (num_groups, n) tensor of magnitudes.

    exact: tau = max_k lam S_k / (1 + lam k), S_k the sum of the k largest a (k = 0 gives 0).
    inexact (CGES): tau = lam * sum(a).
    """
    if not exact:
        return cges_bound(a.sum(dim=1), lam)
    s = torch.sort(a, dim=1, descending=True).values.cumsum(dim=1)
    k = torch.arange(1, a.shape[1] + 1, dtype=a.dtype, device=a.device)
    return newton_tau(s, k, lam).amax(dim=1).clamp(min=0)


def exclusive_shrink_(weight, lam, dim=None, *, exact=True):
    """W_g <- sign(W_g) max(|W_g| - tau_g, 0), tau_g the exclusive-lasso threshold."""
    lam = _value(lam)
    if lam == 0 or weight.numel() == 0:
        return weight
    dims = _reduced(weight, dim)
    rows = _as_groups(weight, dims)
    a = rows.abs()
    l1 = a.sum(dim=1)
    finite = torch.isfinite(l1)
    tau = exclusive_tau(exclusive_threshold(torch.where(finite[:, None], a, 0), lam, exact), l1,
                        torch.ones_like(l1))
    # A NaN group becomes NaN (tau NaN); a group with an infinite value keeps its values (tau 0).
    return _from_groups(weight, dims, shrink_magnitude(rows, tau[:, None]))


def cges_shrink_(weight, lam_group, lam_exclusive, dim=None, *, size_weighted=True, exact=True):
    """Group shrink by lam_group, then exclusive shrink of the result by lam_exclusive."""
    group_shrink_(weight, lam_group, dim, size_weighted=size_weighted)
    return exclusive_shrink_(weight, lam_exclusive, dim, exact=exact)


def foreach_prox_(weights, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, dim=None,
                  size_weighted=True, exact=True):
    """Per tensor: soft threshold by lam_l1, group shrink by lam_group, exclusive shrink by
    lam_exclusive (each skipped when its lam is 0). Per-tensor values come as lists."""
    def each(value, i):
        return value[i] if isinstance(value, list) else value

    for i, w in enumerate(weights):
        l1, lg, le = (_value(each(v, i)) for v in (lam_l1, lam_group, lam_exclusive))
        d, sw, ex = each(dim, i), each(size_weighted, i), each(exact, i)
        if l1 > 0:
            soft_threshold_(w, l1)
        if lg > 0:
            group_shrink_(w, lg, d, size_weighted=sw)
        if le > 0:
            exclusive_shrink_(w, le, d, exact=ex)
    return weights



def coupled_prox_(slices, num_groups: int, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0,
                  size_weighted=True, exact=True):
    """Coupled groups (``slices``: ``(tensor, axis, index[, name])``, ``index[i]`` the group of
    position i along axis): per group, its elements gathered from every slice into one vector,
    that vector's fused step as one group (``n`` = its length), the result written back."""
    for g in range(num_groups):
        views, picks, parts = [], [], []
        for tensor, axis, index, *_ in slices:
            view = tensor.movedim(axis, 0)
            pick = (torch.as_tensor(index).to(tensor.device) == g).nonzero().flatten()
            views.append(view)
            picks.append(pick)
            parts.append(view[pick].reshape(-1))
        if not parts:
            continue
        vector = torch.cat(parts).reshape(1, -1)
        foreach_prox_([vector], lam_l1=lam_l1, lam_group=lam_group, lam_exclusive=lam_exclusive,
                      dim=1, size_weighted=size_weighted, exact=exact)
        offset = 0
        for view, pick, part in zip(views, picks, parts):
            chunk = vector[0, offset:offset + part.numel()]
            view[pick] = chunk.reshape(view[pick].shape).to(view.dtype)
            offset += part.numel()
    return slices

# -- the ops, by the reference (the ops' schemas: csrc/fastprox.cpp) ------------------------------

def group_norms_op(weight: torch.Tensor, dim: list[int]) -> torch.Tensor:
    """``torch.ops.fastprox.group_norms`` by the reference (sums in float32 for 16-bit)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        return group_norms(weight.float(), list(dim)).to(weight.dtype)
    return group_norms(weight, list(dim))


def fused_step(weights, lams, dims, dim_counts, size_weighted, exact, caller="foreach_prox_",
               lam_names=None) -> None:
    """``torch.ops.fastprox.foreach_prox_`` by the reference: checks every threshold first
    (reading them: one synchronisation on an accelerator), then the step of each tensor, in
    float32 for 16-bit weights, rounded once to the weight's dtype."""
    lam_names = lam_names or ("lam_l1", "lam_group", "lam_exclusive")
    rows = lams.reshape(-1, 3).tolist()
    for i, row in enumerate(rows):
        for k, v in enumerate(row):
            if not (math.isfinite(v) and v >= 0):
                index = f"[{i}]" if len(rows) > 1 else ""
                raise ValueError(f"{caller}: {lam_names[k]}{index} must be a finite number >= 0, "
                                 f"got {v}")
    offset = 0
    for w, row, count, sw, ex in zip(weights, rows, dim_counts, size_weighted, exact):
        d = list(dims[offset:offset + count])
        offset += count
        if w.numel() == 0 or not any(row):
            continue
        work = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
        foreach_prox_([work], lam_l1=row[0], lam_group=row[1], lam_exclusive=row[2], dim=tuple(d),
                      size_weighted=sw, exact=ex)
        if work is not w:
            w.copy_(work)


def _per_group(values: torch.Tensor, weight: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Per-group values (shaped like the kept dimensions) broadcast against the weight."""
    for d in sorted(dims):
        values = values.unsqueeze(d)
    return values


def _split_dims(dims, dim_counts) -> list[list[int]]:
    out, offset = [], 0
    for count in dim_counts:
        out.append(list(dims[offset:offset + count]))
        offset += count
    return out


def foreach_group_sums_op(weights, dims, dim_counts, lam_l1, what: int) -> list[torch.Tensor]:
    """``torch.ops.fastprox.foreach_group_sums`` by the reference (group_sums_op per tensor)."""
    if what not in (1, 2, 3):
        raise ValueError(f"foreach_group_sums: what must be 1, 2 or 3, got {what}")
    for i, lam in enumerate(lam_l1):
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"foreach_group_sums: lam_l1[{i}] must be a finite number >= 0, "
                             f"got {lam}")
    return [group_sums_op(w, d, lam, what)
            for w, d, lam in zip(weights, _split_dims(dims, dim_counts), lam_l1)]


def foreach_group_rewrite_op(weights, dims, dim_counts, lam_l1, scales, taus) -> None:
    """``torch.ops.fastprox.foreach_group_rewrite_`` by the reference (every threshold checked
    before any tensor is written)."""
    for i, lam in enumerate(lam_l1):
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"foreach_group_rewrite_: lam_l1[{i}] must be a finite number >= 0, "
                             f"got {lam}")
    for w, d, lam, scale, tau in zip(weights, _split_dims(dims, dim_counts), lam_l1, scales,
                                     taus):
        group_rewrite_op(w, d, lam, scale, tau)


def foreach_group_sums_above_op(weights, dims, dim_counts, lam_l1, scales,
                                taus) -> list[torch.Tensor]:
    """``torch.ops.fastprox.foreach_group_sums_above`` by the reference."""
    for i, lam in enumerate(lam_l1):
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"foreach_group_sums_above: lam_l1[{i}] must be a finite number "
                             f">= 0, got {lam}")
    return [group_sums_above_op(w, d, lam, scale, tau)
            for w, d, lam, scale, tau in zip(weights, _split_dims(dims, dim_counts), lam_l1,
                                             scales, taus)]


def group_sums_above_op(weight: torch.Tensor, dim: list[int], lam_l1: float, scale,
                        tau) -> torch.Tensor:
    """Per group, with m = |soft(W, lam_l1)| * scale_g (scale None: 1): the sum and the count of
    the m > tau_g, stacked; float32 (float64 for float64 weights)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dims = sorted(d % weight.dim() for d in dim)
    m = weight.to(acc).abs()
    if lam_l1 > 0:
        m = shrink_magnitude(m, float(lam_l1))
    if scale is not None:
        m = m * _per_group(scale.to(acc), weight, dims)
    above = m > _per_group(tau.to(acc), weight, dims)

    def total(x):
        return x.sum(dim=dims, dtype=acc) if dims else x.to(acc)

    return torch.stack([total(torch.where(above, m, 0.0)), total(above)])


def group_sums_op(weight: torch.Tensor, dim: list[int], lam_l1: float, what: int) -> torch.Tensor:
    """Per group of y = soft(W, lam_l1): the sum of squares (what & 1), the sum of magnitudes
    and the count of nonzero magnitudes (what & 2), stacked; float32 (float64 for float64
    weights)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dims = sorted(d % weight.dim() for d in dim)
    y = weight.to(acc)
    if lam_l1 > 0:
        y = shrink_magnitude(y, float(lam_l1))

    def total(x):
        return x.sum(dim=dims, dtype=acc) if dims else x.to(acc)

    out = []
    if what & 1:
        out.append(total(y * y))
    if what & 2:
        out += [total(y.abs()), total(y.abs() > 0)]
    return torch.stack(out)


def group_rewrite_op(weight: torch.Tensor, dim: list[int], lam_l1: float, scale, tau) -> None:
    """W <- shrink(soft(W, lam_l1) * scale_g, tau_g), computed in float32 (float64 for float64
    weights), rounded once."""
    if weight.numel() == 0 or (scale is None and tau is None and lam_l1 == 0):
        return
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dims = sorted(d % weight.dim() for d in dim)
    y = weight.to(acc)
    if lam_l1 > 0:
        y = shrink_magnitude(y, float(lam_l1))
    if scale is not None:
        y = y * _per_group(scale.to(acc), weight, dims)
    if tau is not None:
        y = shrink_magnitude(y, _per_group(tau.to(acc), weight, dims))
    weight.copy_(y)


# -- proximal steps in an optimizer's metric (docs/SPEC.md, "Proximal steps in an optimizer's
# metric"): argmin_x 1/2 (x - z)^T diag(d) (x - z) + Omega(x), computed in float64 ----------------

def adam_metric(exp_avg_sq: torch.Tensor, step, beta2: float, eps: float, lr) -> torch.Tensor:
    """d = (sqrt(v_hat) + eps) / lr, v_hat = v / (1 - beta2^step): the diagonal metric of the
    Adam / AdamW step that produced the weight (``exp_avg_sq``: the optimizer's state, or
    ``max_exp_avg_sq`` with amsgrad), in float64."""
    correction = 1 - beta2 ** float(step)
    v_hat = exp_avg_sq.to(torch.float64) / correction
    return (v_hat.sqrt() + eps) / float(lr)


def _metric_soft(z: torch.Tensor, d: torch.Tensor, lam: float) -> torch.Tensor:
    """sign(z) max(|z| - lam/d, 0); an element with d = 0 becomes 0 (NaN stays NaN)."""
    safe = torch.where(d > 0, d, 1.0)
    moved = shrink_magnitude(z, lam / safe)
    return torch.where(d > 0, moved, torch.where(torch.isnan(z), z, torch.zeros_like(z)))


def _metric_group_rows(z: torch.Tensor, d: torch.Tensor, t: float,
                       iterations: int = 200) -> torch.Tensor:
    """The metric group step of (G, n) rows: 0 where ||d z|| <= t, else z_i d_i / (d_i + t/theta)
    with theta the root of sum (d_i z_i)^2 / (d_i theta + t)^2 = 1, bisected in [theta_L, ||z||]."""
    dz = d * z
    finite = torch.isfinite(z).all(dim=1, keepdim=True)
    nan = torch.isnan(z).any(dim=1, keepdim=True)
    zf = torch.where(finite, z, 0.0)
    dzf = torch.where(finite, dz, 0.0)
    a = torch.linalg.vector_norm(dzf, dim=1, keepdim=True)
    keep = a > t
    dmax = d.amax(dim=1, keepdim=True)
    lo = torch.where(keep, (a - t) / torch.where(dmax > 0, dmax, 1.0), 0.0).clamp(min=0)
    hi = torch.linalg.vector_norm(zf, dim=1, keepdim=True)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        f = ((dzf / (d * mid + t)) ** 2).sum(dim=1, keepdim=True) - 1
        lo, hi = torch.where(f > 0, mid, lo), torch.where(f > 0, hi, mid)
    theta = (lo + hi) / 2
    x = dzf * theta / (d * theta + t)
    x = torch.where(keep, x, torch.zeros_like(x))
    # a group with an infinite value keeps its values; a NaN group becomes NaN
    x = torch.where(finite, x, z)
    return torch.where(nan, torch.full_like(z, float("nan")), x)


def _metric_exclusive_rows(z: torch.Tensor, d: torch.Tensor, lam: float,
                           exact: bool) -> torch.Tensor:
    """The metric exclusive step of (G, n) rows: shrink by tau_i = lam S / d_i, S the root of
    S = sum max(|z_i| - lam S/d_i, 0) (exact: the max over k of the top-k (by d|z|) sums
    sum|z| / (1 + lam sum 1/d)), or S = ||z||_1 (CGES's bound, exact=False)."""
    a = z.abs()
    l1 = a.sum(dim=1, keepdim=True)
    finite = torch.isfinite(l1)
    af = torch.where(finite, a, 0.0)
    if exact:
        inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1.0), float("inf"))
        order = torch.sort(af * d, dim=1, descending=True).indices
        big_a = torch.gather(af, 1, order).cumsum(dim=1)
        big_b = torch.gather(inv, 1, order).cumsum(dim=1)
        s = (big_a / (1 + lam * big_b)).nan_to_num(nan=0.0).amax(dim=1, keepdim=True)
        s = s.clamp(min=0)
    else:
        s = af.sum(dim=1, keepdim=True)
    tau = torch.where(d > 0, lam * s / torch.where(d > 0, d, 1.0), float("inf"))
    tau = torch.where(finite, tau, torch.where(torch.isnan(l1), l1, 0.0))
    return shrink_magnitude(z, tau)


def metric_prox_(weight: torch.Tensor, d: torch.Tensor, *, lam_l1=0.0, lam_group=0.0,
                 lam_exclusive=0.0, dim=None, size_weighted: bool = True,
                 exact: bool = True) -> torch.Tensor:
    """The fused step in the metric diag(d) (d shaped like weight, finite, >= 0): soft threshold
    by lam_l1/d, then the metric group step by t = lam_group * c, then the metric exclusive step
    by lam_exclusive (each skipped when its lam is 0), in float64, written back once."""
    l1, lg, le = (_value(v) for v in (lam_l1, lam_group, lam_exclusive))
    if d.shape != weight.shape:
        raise ValueError(f"metric_prox_: d has shape {tuple(d.shape)}, expected "
                         f"{tuple(weight.shape)}")
    if not bool((torch.isfinite(d) & (d >= 0)).all()):
        raise ValueError("metric_prox_: d must be finite and >= 0")
    if (l1 == 0 and lg == 0 and le == 0) or weight.numel() == 0:
        return weight
    dims = _reduced(weight, dim)
    z = _as_groups(weight.to(torch.float64), dims)
    dd = _as_groups(d.to(torch.float64), dims)
    if l1 > 0:
        z = _metric_soft(z, dd, l1)
    if lg > 0:
        c = math.sqrt(_group_size(weight, dims)) if size_weighted else 1.0
        z = _metric_group_rows(z, dd, lg * c)
    if le > 0:
        z = _metric_exclusive_rows(z, dd, le, exact)
    return _from_groups(weight, dims, z.to(weight.dtype))


def foreach_metric_prox_op(weights, moments, lams, metric, dims, dim_counts, size_weighted,
                           exact, names=None, moments_checked=False) -> None:
    """``torch.ops.fastprox.foreach_metric_prox_`` by the reference: per weight, d from its
    second moment and (scale, eps, lr) = metric[i], then metric_prox_ (every argument checked
    before any weight is written; the moments' values not with ``moments_checked``)."""
    op = "foreach_metric_prox_"
    n = len(weights)
    lams = lams.reshape(n, 3).tolist()
    metric = metric.reshape(n, 3).tolist()
    ds = []
    for i, (w, v, lam, (scale, eps, lr)) in enumerate(zip(weights, moments, lams, metric)):
        if not all(math.isfinite(x) and x >= 0 for x in lam):
            raise ValueError(f"{op}: lams[{i}] must be finite numbers >= 0")
        if not (all(math.isfinite(x) for x in (scale, eps, lr)) and scale >= 0 and eps >= 0
                and lr > 0):
            raise ValueError(f"{op}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
        label = names[i] if names is not None else f"moments[{i}]"
        if v.shape != w.shape:
            raise ValueError(f"{op}: {label} has shape {tuple(v.shape)}, expected "
                             f"{tuple(w.shape)}")
        v = v.to(torch.float64)
        if any(lam) and w.numel():
            if not moments_checked and not bool((torch.isfinite(v) & (v >= 0)).all()):
                raise ValueError(f"{op}: {label} has negative, NaN or infinite entries (a "
                                 "second moment is finite and >= 0)")
            for j, other in enumerate(weights):
                if shares_memory(moments[i], other):
                    raise ValueError(f"{op}: {label} shares memory with weights[{j}], which "
                                     "the step writes")
        ds.append(((v * scale).sqrt() + eps) / lr)
    for w, d, lam, tensor_dims, sw, ex in zip(weights, ds, lams, _split_dims(dims, dim_counts),
                                             size_weighted, exact):
        metric_prox_(w, d, lam_l1=lam[0], lam_group=lam[1], lam_exclusive=lam[2],
                     dim=tensor_dims, size_weighted=sw, exact=ex)


def coupled_metric_prox_op(members, moments, axes, metric, set_sizes, slices, starts,
                           thresholds, lam_l1, lam_exclusive, exact, direct=False,
                           names=None, moments_checked=False) -> None:
    """``torch.ops.fastprox.coupled_metric_prox_`` by the reference: per set in turn, per group,
    its slices (member, position) joined into one row of z and d in float64 (d from the
    member's moment and (scale, eps, lr) = metric[k], or the moment itself when ``direct``),
    the metric soft threshold, group step by the group's own t_g and exclusive step, each slice
    written back once (the arguments checked before any member is written; the moments'
    values not with ``moments_checked``)."""
    op = "coupled_metric_prox_"
    n = len(members)
    rows = metric.reshape(n, 3).tolist()
    label = (lambda i: names[i]) if names is not None else (lambda i: f"members[{i}]")
    ds = []
    for i, (w, v, (scale, eps, lr)) in enumerate(zip(members, moments, rows)):
        if not (all(math.isfinite(x) for x in (scale, eps, lr)) and scale >= 0 and eps >= 0
                and lr > 0):
            raise ValueError(f"{op}: metric[{i}] must be (scale >= 0, eps >= 0, lr > 0), finite")
        if v.shape != w.shape:
            raise ValueError(f"{op}: the metric of {label(i)} has shape {tuple(v.shape)}, "
                             f"expected {tuple(w.shape)}")
        v = v.to(torch.float64)
        if not moments_checked and not bool((torch.isfinite(v) & (v >= 0)).all()):
            raise ValueError(f"{op}: the metric of {label(i)} has negative, NaN or infinite "
                             "entries")
        ds.append(v if direct else ((v * scale).sqrt() + eps) / lr)
    first = 0
    for j, size in enumerate(set_sizes):
        l1, le = float(lam_l1[j]), float(lam_exclusive[j])
        if not (math.isfinite(l1) and l1 >= 0 and math.isfinite(le) and le >= 0):
            raise ValueError(f"{op}: lam_l1[{j}] and lam_exclusive[{j}] must be finite numbers "
                             ">= 0")
        t = thresholds[j].tolist()
        if not all(math.isfinite(x) and x >= 0 for x in t):
            raise ValueError(f"{op}: thresholds[{j}] must be finite numbers >= 0")
        set_members = list(range(first, first + size))
        first += size
        pairs = slices[j].tolist()
        offsets = starts[j].tolist()
        for g in range(len(offsets) - 1):
            parts = [(set_members[k], p) for k, p in pairs[offsets[g]:offsets[g + 1]]]
            if not parts or (l1 == 0 and le == 0 and t[g] == 0):
                continue
            views = [members[k].movedim(axes[k], 0)[p] for k, p in parts]
            z = torch.cat([v.reshape(-1).to(torch.float64) for v in views])[None]
            d = torch.cat([ds[k].movedim(axes[k], 0)[p].reshape(-1) for k, p in parts])[None]
            if l1 > 0:
                z = _metric_soft(z, d, l1)
            if t[g] > 0:
                z = _metric_group_rows(z, d, t[g])
            if le > 0:
                z = _metric_exclusive_rows(z, d, le, bool(exact[j]))
            at = 0
            for v in views:
                v.copy_(z[0, at:at + v.numel()].reshape(v.shape).to(v.dtype))
                at += v.numel()
