"""The flat dispatcher moves every row exactly where one process computes it must go, and back.

Dispatch, an expert function, combine and the backward on 2 and 4 gloo ranks, fp32, compared bit for
bit with a single-process computation of the same rows (see dispatch_checks.py): uneven counts, local
experts that get no rows, a rank that sends nothing to a peer, a rank whose experts get nothing; plain,
with the fp8 codec (straight-through backward) and with the gradient packed too.
"""

from __future__ import annotations

import math

import pytest
from dispatch_checks import DIM, exchange_check

CODECS = [(None, None), ("fp8", None), ("fp8", "fp8")]


@pytest.mark.parametrize(("codec", "grad_codec"), CODECS, ids=["plain", "fp8", "fp8-grad"])
@pytest.mark.parametrize("scenario", ["uneven", "idle"])
@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_and_gradients_equal_one_process(
    request, world, scenario, codec, grad_codec
) -> None:
    results = request.getfixturevalue(f"pool{world}").run(exchange_check, scenario, codec, grad_codec)
    if scenario == "idle":
        assert results[-1]["received_rows"] == 0
    row_bytes = DIM * 4 if codec is None else DIM + 4 * math.ceil(DIM / 128)  # fp32, or codes + scales
    for r in results:  # the whole payload is counted, this rank's own rows included
        assert r["stats"]["comm/ep.dispatch/bytes"] == r["sent_rows"] * DIM * 4
        assert r["stats"]["comm/ep.dispatch/bytes_sent"] == r["sent_rows"] * row_bytes
