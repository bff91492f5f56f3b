"""The greedy-parting rule the engine tests share: a parting passes only at a near-tie."""

from __future__ import annotations

from common_kernels.testing import near_ties


def test_a_parting_passes_only_where_the_logit_or_the_router_margin_is_a_near_tie():
    assert near_ties([], "float32")
    assert near_ties([(0, 5, 0.05, 1.0)], "float32")  # the shim itself barely preferred its token
    assert near_ties([(0, 5, 0.3, 4e-5)], "float32")  # a router choice within rounding
    assert not near_ties([(0, 5, 0.3, 0.2)], "float32")  # wide on both: a fault
    assert not near_ties([(0, 5, 0.05, 1.0), (1, 2, 0.3, 0.2)], "float32")  # one fault among ties
    assert near_ties([(0, 5, 0.3, 5e-3)], "bfloat16") and not near_ties([(0, 5, 0.3, 5e-3)], "float32")
