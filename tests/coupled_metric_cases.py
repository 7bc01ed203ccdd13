"""Coupled sets in an optimizer's metric for the tests of ``coupled_metric_prox_`` (the op, its
backends, the public API): random sets over every layout a model gives (rows, columns, biases,
conv input and output channels, strided views, groups of different sizes, a group with no
slice), their metrics, and the float64 oracle: per group, the plain metric step of the
reference on the row joining its slices (members in order, positions in order)."""

from __future__ import annotations

import math

import torch

import fastprox
from fastprox import reference

NUM_GROUPS = 7  # the last one holds no slice


def random_set(dtype=torch.float32, device="cpu", special=False):
    """(groups, members, moments): a set over five members of different layouts. ``special``:
    a zero group (2), a NaN (group 3), an infinite value (group 4) and some d = 0 entries."""
    g = NUM_GROUPS
    rows = torch.randn(6, 5, dtype=torch.float64) * 0.3             # group by row, permuted
    cols = torch.randn(4, 6, dtype=torch.float64) * 0.3             # group by column
    bias = torch.randn(6, dtype=torch.float64) * 0.3
    conv = torch.randn(3, 9, 3, 3, dtype=torch.float64) * 0.3       # input channels, repeats
    base = torch.randn(10, 6, dtype=torch.float64) * 0.3            # a strided view
    if dtype != torch.float64:
        rows, cols, bias, conv, base = (t.to(dtype) for t in (rows, cols, bias, conv, base))
    rows, cols, bias, conv, base = (t.to(device) for t in (rows, cols, bias, conv, base))
    strided = base[::2]
    perm = torch.randperm(6).tolist()
    conv_index = [0, 1, 1, 2, 3, 4, 5, 0, 3]
    slices = [(rows, 0, perm, "rows"), (cols, 1, list(range(6)), "cols"),
              (bias, 0, list(range(6)), "bias"), (conv, 1, conv_index, "conv"),
              (strided, 1, [5, 4, 3, 2, 1, 0], "strided")]
    members = [rows, cols, bias, conv, strided]
    if special:
        with torch.no_grad():
            for m, axis, index, _ in slices:
                view = m.movedim(axis, 0)
                for p, grp in enumerate(index):
                    if grp == 2:
                        view[p] = 0
            rows[perm.index(3), 1] = math.nan
            cols[2, 4] = math.inf
    groups = fastprox.CoupledGroups(slices, g, name="set")
    moments = [torch.rand(m.shape, dtype=torch.float64, device=device).to(m.dtype) * 2 + 0.05
               for m in members]
    if special:
        moments[0][perm.index(1), :2] = 0
        moments[3][:, 2, 0, :] = 0
    return groups, members, moments


def wide_set(dtype=torch.float32, groups=700, device="cpu"):
    """(groups, members, moments): a set of many groups (those of a wide layer: its rows, its
    bias, the next layers' input columns and input channels), more than one block of the
    kernel's, most members read as narrow columns (a Linear's input units, 3x3 and 1x1
    convolutions' input channels), some through a permuted or strided view."""
    g = groups

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device) * 0.2

    fc1 = rand(g, 40)                 # rows
    bias = rand(g)
    fc2 = rand(40, g)                 # columns
    conv3 = rand(6, g, 3, 3)          # input channels, 3x3
    conv1 = rand(5, g, 1, 1)          # 1x1, permuted
    strided = rand(30, 2 * g)[:, ::2]  # columns of a view
    perm = torch.randperm(g).tolist()
    order = list(range(g))
    slices = [(fc1, 0, order, "fc1"), (bias, 0, order, "bias"), (fc2, 1, order, "fc2"),
              (conv3, 1, order, "conv3"), (conv1, 1, perm, "conv1"),
              (strided, 1, order, "strided")]
    set_ = fastprox.CoupledGroups(slices, g, name="wide")
    members = [fc1, bias, fc2, conv3, conv1, strided]
    moments = [torch.rand(m.shape, dtype=torch.float64, device=device).to(dtype) * 2 + 0.05
               for m in members]
    return set_, members, moments


def oracle(groups, ds, *, lam_l1=0.0, lam_group=0.0, lam_exclusive=0.0, size_weighted=True,
           exact=True):
    """Per member, the float64 result of the metric step with metric ``ds`` (float64, shaped
    like the members): per group, reference.metric_prox_ on the row joining its slices, with
    t_g = lam_group sqrt(n_g) (or lam_group)."""
    out = [m.tensor.detach().to(torch.float64).cpu().clone() for m in groups.slices]
    ds = [d.detach().to(torch.float64).cpu() for d in ds]
    parts_of = {}
    for k, m in enumerate(groups.slices):
        for p, grp in enumerate(m.index.tolist()):
            parts_of.setdefault(grp, []).append((k, p))
    for grp in range(groups.num_groups):
        parts = parts_of.get(grp, [])
        if not parts:
            continue
        zs = [out[k].movedim(groups.slices[k].axis, 0)[p] for k, p in parts]
        z = torch.cat([v.reshape(-1) for v in zs])[None].clone()
        d = torch.cat([ds[k].movedim(groups.slices[k].axis, 0)[p].reshape(-1)
                       for k, p in parts])[None]
        t = lam_group * (math.sqrt(z.shape[1]) if size_weighted else 1.0)
        reference.metric_prox_(z, d, lam_l1=lam_l1, lam_group=t, lam_exclusive=lam_exclusive,
                               dim=1, size_weighted=False, exact=exact)
        at = 0
        for v in zs:
            v.copy_(z[0, at:at + v.numel()].reshape(v.shape))
            at += v.numel()
    return out


LAMS = [dict(lam_group=0.4), dict(lam_l1=0.05, lam_group=0.3),
        dict(lam_group=0.2, lam_exclusive=0.05), dict(lam_exclusive=0.08),
        dict(lam_exclusive=0.05, exact=False), dict(lam_l1=0.1),
        dict(lam_l1=0.02, lam_group=0.1, lam_exclusive=0.02, size_weighted=False),
        dict(lam_group=1e6), dict(lam_exclusive=1e6)]


def tolerance(dtype) -> dict:
    return {torch.float64: dict(rtol=1e-9, atol=1e-11),
            torch.float32: dict(rtol=3e-5, atol=3e-6),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=4e-3, atol=4e-3)}[dtype]
