"""`benchmarks/norm_kernels.py`: the opaque aten RMSNorm ops compute what `F.rms_norm` does, and the
bytes each row must move."""

from __future__ import annotations

import pytest
import torch

norm_kernels = pytest.importorskip("benchmarks.norm_kernels")


def _inputs(device: str, scale: float) -> tuple[torch.Tensor, ...]:
    """x (fp32), a (bf16), weight, dh, dn; `scale` small makes eps matter next to the mean square."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 32, generator=gen) * scale).to(device)
    a = (torch.randn(64, 32, generator=gen) * scale).to(device, torch.bfloat16)
    weight = (torch.rand(32, generator=gen) + 0.5).to(device)
    dh = torch.randn(64, 32, generator=gen).to(device)
    dn = torch.randn(64, 32, generator=gen).to(device, torch.bfloat16)
    return x, a, weight, dh, dn


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_aten_norm_op_forward_matches_on_cpu(scale: float) -> None:
    x, a, weight, _, _ = _inputs("cpu", scale)
    for got, want in zip(
        norm_kernels.add_norm_aten(x, a, weight), norm_kernels.add_norm(x, a, weight), strict=True
    ):
        torch.testing.assert_close(got, want)
    h = x + a  # the fp32 output and rstd against their definition, at fp32 tolerance
    out, rstd = norm_kernels.fused_rms_norm(h, weight, norm_kernels.EPS)
    want_rstd = (h.square().mean(-1, keepdim=True) + norm_kernels.EPS).rsqrt()
    torch.testing.assert_close(rstd, want_rstd)
    torch.testing.assert_close(out, h * want_rstd * weight)


def test_aten_norm_op_fake_matches_the_op() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        args = (torch.randn(4, 8, dtype=dtype), torch.rand(8, dtype=dtype), norm_kernels.EPS)
        torch.library.opcheck(
            norm_kernels.fused_rms_norm, args, test_utils=("test_schema", "test_faketensor")
        )


def test_min_bytes_counts_the_branch_gradient_only_when_it_is_its_own_tensor() -> None:
    # fp32: x, a read, h, n written (12); dh, dn, h read, dx and da written (16). bf16: 8 + 8.
    assert norm_kernels.min_bytes(1, 1, torch.float32) == 28
    assert norm_kernels.min_bytes(1, 1, torch.bfloat16) == 16
    assert norm_kernels.min_bytes(3, 5, torch.float32) == 15 * 28


@pytest.mark.skipif(not torch.cuda.is_available(), reason="aten's fused RMSNorm backward is CUDA-only")
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_aten_norm_ops_forward_and_backward_match_on_gpu(scale: float) -> None:
    x0, a0, w0, dh, dn = _inputs("cuda", scale)
    results = []
    for fn in (norm_kernels.add_norm, norm_kernels.add_norm_aten, torch.compile(norm_kernels.add_norm_aten)):
        x, a, w = (t.clone().requires_grad_() for t in (x0, a0, w0))
        h, n = fn(x, a, w)
        results.append((h, n, *torch.autograd.grad((h, n), (x, a, w), (dh, dn))))
    for got in results[1:]:
        for g, want in zip(got, results[0], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-3 if g.dtype == torch.float32 else 1e-2)
    grad = torch.randn(64, 32, device="cuda")
    h = (x0 + a0).contiguous()
    _, rstd = norm_kernels.fused_rms_norm(h, w0, norm_kernels.EPS)
    torch.library.opcheck(
        norm_kernels.fused_rms_norm_backward,
        (grad, h, rstd, w0),
        test_utils=("test_schema", "test_faketensor"),
    )
