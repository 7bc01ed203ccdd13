"""Where the groups of a weight lie in memory: the Python twin of csrc/cpu/group_layout.cpp.

For a dense weight, its dimensions in memory order (size-1 ones dropped, neighbours of the same
kind merged) alternate between kept (K) and reduced (R) runs. The patterns
``K | R | KR | RK | RKR | KRK | KRKR`` are the 4-D view ``[batch][outer][groups][inner]`` of the
weight's memory, group (b, g) being ``{x[b][o][g][i] : o < outer, i < inner}``; the kernels read
such groups in place. Other weights go through a contiguous working copy written back afterwards
(two extra passes): strided views that are not dense (``w[:, ::2]``) are copied as they are;
layouts with more alternations are copied with the kept dimensions first (the rows layout).
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class GroupLayout:
    work: torch.Tensor            # what the kernel reads and writes: the weight or a copy
    batch: int = 1
    outer: int = 1
    groups: int = 1
    inner: int = 1
    is_copy: bool = False         # work must be copied back into the weight afterwards
    copy_perm: tuple = ()         # work is weight.permute(copy_perm) (empty: same order)
    kept_in_group_order: tuple = ()  # kept dims (size > 1) in the order groups are enumerated

    @property
    def group_size(self) -> int:
        return self.outer * self.inner

    @property
    def num_groups(self) -> int:
        return self.batch * self.groups


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some order of its dimensions is a contiguous layout."""
    expected = 1
    for d in sorted((d for d in range(t.dim()) if t.size(d) > 1), key=lambda d: t.stride(d)):
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _fit(t: torch.Tensor, reduced: list[bool], logical: list[int]):
    order = [d for d in range(t.dim()) if t.size(d) > 1]
    order.sort(key=lambda d: -t.stride(d))  # dense: memory order
    runs: list[list] = []  # [kept, size, dims]
    for d in order:
        kept = not reduced[d]
        if not runs or runs[-1][0] != kept:
            runs.append([kept, 1, []])
        runs[-1][1] *= t.size(d)
        runs[-1][2].append(logical[d])
    pattern = "".join("K" if r[0] else "R" for r in runs)
    size = [r[1] for r in runs]
    names = {"": (), "K": ("groups",), "R": ("inner",), "KR": ("groups", "inner"),
             "RK": ("outer", "groups"), "RKR": ("outer", "groups", "inner"),
             "KRK": ("batch", "outer", "groups"), "KRKR": ("batch", "outer", "groups", "inner")}
    if pattern not in names:
        return None
    shape = dict(zip(names[pattern], size))
    kept = tuple(d for r in runs if r[0] for d in r[2])
    return shape, kept


def analyze(weight: torch.Tensor, dims: list[int]) -> GroupLayout:
    """The layout of ``weight``'s groups (``dims`` reduced: sorted, in range, unique)."""
    reduced = [d in dims for d in range(weight.dim())]
    identity = list(range(weight.dim()))
    work = weight if is_dense(weight) else weight.contiguous()
    fit = _fit(work, reduced, identity)
    if fit is not None:
        return GroupLayout(work, is_copy=work is not weight, kept_in_group_order=fit[1],
                           **fit[0])
    perm = [d for d in identity if not reduced[d]] + [d for d in identity if reduced[d]]
    work = weight.permute(perm).contiguous()
    num_kept = weight.dim() - len(dims)
    shape, kept = _fit(work, [i >= num_kept for i in range(len(perm))], perm)
    return GroupLayout(work, is_copy=True, copy_perm=tuple(perm), kept_in_group_order=kept,
                       **shape)


def finish(weight: torch.Tensor, layout: GroupLayout) -> None:
    """Copies the working tensor back into the weight when the layout used a copy."""
    if not layout.is_copy:
        return
    target = weight.permute(layout.copy_perm) if layout.copy_perm else weight
    target.copy_(layout.work)


def to_kept_shape(per_group: torch.Tensor, weight: torch.Tensor, dims: list[int],
                  layout: GroupLayout) -> torch.Tensor:
    """Per-group values in group order -> a contiguous tensor shaped like the kept dimensions
    of the weight (size-1 ones included), in logical order."""
    kept_shape = [s for d, s in enumerate(weight.shape) if d not in dims]
    order = layout.kept_in_group_order
    view = per_group.view([weight.size(d) for d in order])
    to_logical = sorted(range(len(order)), key=lambda a: order[a])
    return view.permute(to_logical).reshape(kept_shape).contiguous()


def group_size(weight: torch.Tensor, dims: list[int]) -> int:
    return math.prod(weight.shape[d] for d in dims)
