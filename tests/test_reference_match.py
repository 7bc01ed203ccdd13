"""Every operator against the float64 reference: dtypes x group layouts x strided views."""

import pytest
import torch

from helpers import (DTYPES, GROUPED_OPS, OPS, TOLERANCES, assert_matches_reference, expected,
                     random_weight, run)

# (shape, dim): rows, columns, conv filters / input channels / CGES positions, tuple dims, odd
# and degenerate sizes, and layouts that need the kept-first working copy ((1, 3) of a 4-D).
LAYOUTS = [
    ((1, 1), None), ((1, 37), None), ((37, 1), None), ((1, 37), 0), ((37, 1), 0),
    ((5, 123), None), ((5, 123), 0), ((5, 123), -1), ((5, 123), (0, 1)), ((6, 5), ()),
    ((0, 7), None), ((7, 0), None), ((0, 7), 0), ((7, 0), 0),
    ((17,), None), ((17,), 0),
    ((64, 300), 0), ((300, 64), 0), ((3, 1000), 0), ((1000, 3), None),
    ((4, 5, 6), None), ((4, 5, 6), 1), ((4, 5, 6), (0, 2)), ((4, 5, 6), -1), ((4, 5, 6), (0, 1)),
    ((16, 8, 3, 3), None), ((16, 8, 3, 3), (0, 2, 3)), ((16, 8, 3, 3), 0),
    ((16, 8, 3, 3), (1, 3)), ((16, 8, 3, 3), (2, 3)), ((2, 3, 4, 5), (0, 2)),
    ((20, 3, 5, 5), (0, 2, 3)), ((3, 200, 150), (0, 2)),
    # wider than one column chunk of the CPU column path (4096), groups straddling chunk edges
    ((33, 9001), 0), ((5, 1000, 3, 3), (0, 2, 3)),
]


def _id(layout):
    shape, dim = layout
    return f"{'x'.join(map(str, shape))}-dim{dim}"


# soft_threshold_ has no groups: it takes the shapes only.
CASES = [(op, layout) for op in OPS for layout in LAYOUTS if op.grouped or layout[1] is None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, layout", CASES, ids=lambda c: str(c) if isinstance(c, type(OPS[0])) else _id(c))
def test_matches_reference(op, layout, dtype):
    shape, dim = layout
    assert_matches_reference(op, random_weight(shape, dtype), dim=dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_large_tensor_uses_all_paths(op, dtype):
    # Big enough for several threads and several column tiles.
    for shape, dim in [((384, 1024), None), ((384, 1024), 0), ((64, 96, 3, 3), (0, 2, 3))]:
        if not op.grouped and dim is not None:
            continue
        assert_matches_reference(op, random_weight(shape, dtype), dim=dim)


def _views():
    """(name, make) pairs: make(dtype) -> (base, view, dims to test) with view sharing base."""
    def transposed(dtype):
        base = random_weight((40, 70), dtype)
        return base, base.t()

    def every_other_column(dtype):
        base = random_weight((30, 90), dtype)
        return base, base[:, ::2]

    def row_slice(dtype):
        base = random_weight((30, 50), dtype)
        return base, base[3:17]

    def channels_last(dtype):
        base = random_weight((12, 6, 3, 3), dtype).contiguous(memory_format=torch.channels_last)
        return base, base

    def transposed_3d(dtype):
        base = random_weight((6, 7, 8), dtype)
        return base, base.transpose(0, 2)

    def strided_3d(dtype):
        base = random_weight((6, 14, 9), dtype)
        return base, base[:, 1::3, ::2]

    return [transposed, every_other_column, row_slice, channels_last, transposed_3d, strided_3d]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("make", _views(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("op", OPS, ids=str)
def test_strided_views_update_in_place(op, make, dtype):
    base, view = make(dtype)
    dims = [None, 0, tuple(range(1, view.dim() - 1)) or 1] if op.grouped else [None]
    for dim in dims:
        base_before = base.clone()
        view_before = view.clone()
        want_view = expected(op, view_before, dim=dim)
        assert_matches_reference(op, view, dim=dim)
        # Same values as on a contiguous copy (the reference ran on one) ...
        torch.testing.assert_close(view.double(), want_view, equal_nan=True,
                                   **_loose(dtype))
        # ... and nothing of the base outside the view was touched.
        mask = torch.ones_like(base, dtype=torch.bool)
        _view_of(mask, base, view).fill_(False)
        assert torch.equal(base[mask], base_before[mask])
        base.copy_(base_before)


def _loose(dtype):
    tol = TOLERANCES[dtype]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * 8)


def _view_of(mask, base, view):
    """The same view of `mask` as `view` is of `base`."""
    offset = view.storage_offset() - base.storage_offset()
    return mask.as_strided(view.shape, view.stride(), mask.storage_offset() + offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", GROUPED_OPS, ids=str)
def test_dim_spellings_agree(op, dtype):
    w = random_weight((6, 4, 3, 3), dtype)
    results = []
    for dim in [(0, 2, 3), [0, 2, 3], (3, 0, 2), (-4, -2, -1)]:
        results.append(run(op, w.clone(), dim=dim))
    for r in results[1:]:
        assert torch.equal(r, results[0])
