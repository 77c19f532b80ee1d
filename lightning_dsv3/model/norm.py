"""RMSNorm whose weight takes the input's dtype, so mixed precision keeps torch's fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and state-dict names) that casts its weight to the input's dtype.

    Under bf16 autocast with fp32 weights, the norms that read a linear's output (MLA's q and kv
    norms) get a bf16 input and an fp32 weight, a pair torch's fused kernel refuses: it falls back to
    the composite one (about five kernels each way, an fp32 output and an fp32 copy kept for backward).
    The fused kernel normalises in fp32 either way; the cast only rounds the weight to bf16 before the
    product, whose result a bf16 GEMM reads next anyway. The weight's gradient comes out of the kernel
    in bf16 and is cast to the fp32 weight's gradient, as an autocast linear's weight gradient is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)
