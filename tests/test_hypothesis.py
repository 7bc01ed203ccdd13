"""Property tests: random shapes, dims, dtypes and values (specials included) against the
reference."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DTYPES, OPS, assert_matches_reference


@st.composite
def cases(draw):
    op = draw(st.sampled_from(OPS))
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from(DTYPES))
    dim = None
    if op.grouped and draw(st.booleans()):
        dim = tuple(draw(st.sets(st.integers(0, ndim - 1))))
        if len(dim) == 1 and draw(st.booleans()):
            dim = dim[0] - ndim  # a negative int
    n = math.prod(shape)
    values = draw(st.lists(
        st.one_of(st.floats(-10, 10, width=16), st.sampled_from([0.0, -0.0, math.nan, math.inf,
                                                                  -math.inf])),
        min_size=n, max_size=n))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    lams = tuple(draw(st.floats(0, 2, width=16)) for _ in op.lams)
    w = torch.tensor(values, dtype=torch.float64).reshape(shape) * scale
    if draw(st.booleans()) and ndim >= 2:
        w = w.transpose(0, -1).contiguous().transpose(0, -1)  # same values, permuted strides
    return op, w.to(dtype), dim, tuple(l * scale for l in lams)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_cases_match_reference(case):
    op, w, dim, lams = case
    assert_matches_reference(op, w, lams=lams, dim=dim)
