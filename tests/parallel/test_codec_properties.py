"""Top-k with error feedback over arbitrary gradients (the block codecs' bounds: test_compression.py).

For any sequence of inputs, ratios and dtypes: each step sends the k largest entries of input +
residual, what it does not send stays in the residual exactly (nothing is lost), and the residual
keeps within the bound the codec states.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_dsv3.parallel.compression import TopKCodec

steps_of_inputs = st.integers(1, 64).flatmap(
    lambda n: st.lists(
        hnp.arrays(np.float32, n, elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
        min_size=1,
        max_size=6,
    )
)


@settings(max_examples=120, deadline=None)
@given(inputs=steps_of_inputs, ratio=st.floats(0.01, 1.0), bf16=st.booleans())
def test_topk_sends_the_largest_and_loses_nothing(inputs: list[np.ndarray], ratio: float, bf16: bool) -> None:
    codec = TopKCodec(ratio=ratio)
    dtype = torch.bfloat16 if bf16 else torch.float32
    numel = inputs[0].size
    contraction = math.sqrt(1 - codec.k(numel) / numel)
    residual = torch.zeros(numel)
    sent_sum, input_sum, max_norm = torch.zeros(numel), torch.zeros(numel), 0.0
    for array in inputs:
        x = torch.from_numpy(array).to(dtype)
        acc = x.float() + residual
        payload = codec.encode(x, "g")
        sent = codec.decode(payload).float()
        residual = codec.residuals["g"]
        assert payload.values.numel() == codec.k(numel)
        chosen = torch.zeros(numel, dtype=torch.bool)
        chosen[payload.indices.long()] = True
        if (~chosen).any():  # every entry sent is at least as large as every entry kept back
            assert acc[chosen].abs().min() >= acc[~chosen].abs().max()
        torch.testing.assert_close(sent + residual, acc, rtol=0, atol=0)  # exact: only rounding stays behind
        sent_sum += sent
        input_sum += x.float()
        max_norm = max(max_norm, float(x.float().norm()))
        bound = contraction / (1 - contraction) * max_norm if contraction < 1 else math.inf
        rounding = float(acc.abs().max()) * 2**-8 * math.sqrt(numel) if bf16 else 0.0
        assert float(residual.norm()) <= bound * (1 + 1e-5) + rounding + 1e-6
    torch.testing.assert_close(sent_sum + residual, input_sum, rtol=1e-5, atol=1e-2)
