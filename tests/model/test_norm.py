"""RMSNorm under mixed dtypes: torch's fused path, the same values, gradients back to fp32 weights."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_dsv3.model.norm import RMSNorm


def test_a_bf16_input_with_fp32_weight_matches_torchs_norm_without_the_fallback() -> None:
    torch.manual_seed(0)
    ours, theirs = RMSNorm(64, eps=1e-6), nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(8, 64).bfloat16()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Mismatch dtype between input and weight.*")
        y = ours(x)
    assert y.dtype == torch.bfloat16
    reference = theirs(x.float()).bfloat16()  # normalised in fp32, rounded once
    assert torch.allclose(y.float(), reference.float(), rtol=2**-7, atol=1e-3)
    y.float().sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32


def test_same_parameters_and_names_as_torchs() -> None:
    assert RMSNorm(16).state_dict().keys() == nn.RMSNorm(16).state_dict().keys()
    x = torch.randn(4, 16)
    assert torch.equal(RMSNorm(16)(x), nn.RMSNorm(16)(x))  # fp32: nothing to cast
