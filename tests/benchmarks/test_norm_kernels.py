"""`benchmarks/norm_kernels.py`: the opaque aten RMSNorm op computes what `F.rms_norm` does."""

from __future__ import annotations

import pytest
import torch

norm_kernels = pytest.importorskip("benchmarks.norm_kernels")


def _both(device: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(h, n, dx, da, dw) of `add_norm` and of `add_norm_aten` on the same inputs and output gradients."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 32, generator=gen).to(device)
    a0 = torch.randn(64, 32, generator=gen).to(device, torch.bfloat16)
    w0 = torch.rand(32, generator=gen).to(device) + 0.5
    dh = torch.randn(64, 32, generator=gen).to(device)
    dn = torch.randn(64, 32, generator=gen).to(device, torch.bfloat16)
    out = []
    for fn in (norm_kernels.add_norm, norm_kernels.add_norm_aten):
        x, a, w = (t.clone().requires_grad_() for t in (x0, a0, w0))
        h, n = fn(x, a, w)
        out.append((h, n, *torch.autograd.grad((h, n), (x, a, w), (dh, dn))))
    return out[0], out[1]


def test_aten_norm_op_forward_matches_on_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    x, a, w = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen), torch.rand(32) + 0.5
    for got, want in zip(norm_kernels.add_norm_aten(x, a, w), norm_kernels.add_norm(x, a, w), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="aten's fused RMSNorm backward is CUDA-only")
def test_aten_norm_op_forward_and_backward_match_on_gpu() -> None:
    plain, aten = _both("cuda")
    for got, want in zip(aten, plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
