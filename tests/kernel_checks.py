"""Run in a subprocess with TRITON_INTERPRET=1 (set before Triton is imported): the fused codec kernels,
executed by Triton's CPU interpreter, against the eager codec, byte for byte."""

from __future__ import annotations

import torch

from lightning_dsv3.parallel import codec_kernels
from lightning_dsv3.parallel.compression import BlockCodec, Fp8BlockCodec, Int8BlockCodec

F32_MAX = torch.finfo(torch.float32).max


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "randn": torch.randn(5, 300, generator=g),
        "wide_range": torch.randn(3, 1200, generator=g) * torch.logspace(-30, 30, 1200),
        "zeros": torch.zeros(2, 256),
        "negative_zeros": -torch.zeros(2, 130),
        "huge": torch.full((2, 130), F32_MAX) * torch.tensor([1.0, -1.0]).repeat(65),
        "spike_among_tiny": torch.cat([torch.tensor([[1e30]]), torch.full((1, 200), 1e-30)], dim=1),
        "one_channel": torch.tensor([[0.5], [-3.0], [0.0]]),
        "ties": (torch.arange(-600, 600, dtype=torch.float32) / 4).view(2, 600),
        "fp32_subnormals": torch.tensor([1e-45, 3e-45, 1e-42, 1e-40]).repeat(2, 40),
    }


def check(codec: BlockCodec, x: torch.Tensor, device: str = "cpu") -> None:
    """The kernels on `device` (the interpreter on "cpu") against the eager codec on the CPU."""
    fp8 = codec.value_dtype == torch.float8_e4m3fn
    ref = codec.pack(x)
    got = codec_kernels.pack(x.to(device), codec.block_size, codec.qmax, fp8).cpu()
    assert torch.equal(got, ref), (
        f"{codec.name} pack of {tuple(x.shape)} {x.dtype}: {(got != ref).sum()} bytes"
    )
    # decoded to fp32 only: the interpreter's own fp32 -> bf16 store rounds differently from a GPU's
    want = codec.unpack(ref, x.shape, torch.float32)
    out = codec_kernels.unpack(ref.to(device), x.shape[-1], codec.block_size, torch.float32, fp8).cpu()
    assert _same(out, want), f"{codec.name} unpack of {tuple(x.shape)} {x.dtype}"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0.0 != 0.0), except that any NaN equals any NaN (payload bits may differ)."""
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def check_all(device: str = "cpu") -> None:
    """Every case, in fp32 and bf16, through both codecs, and every fp8 code's decoding."""
    for codec in (Fp8BlockCodec(), Int8BlockCodec()):
        for name, x in cases().items():
            check(codec, x, device)
            if device != "cpu" or name != "fp32_subnormals":  # the interpreter loads bf16 subnormals wrongly
                check(codec, x.clamp(-(2.0**127), 2.0**127).to(torch.bfloat16), device)
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    buf = torch.cat([codes, torch.ones(2).view(torch.uint8).view(2, 4)], dim=1)  # every code, scale 1
    decoded = codec_kernels.unpack(buf.to(device), 128, 128, torch.float32, fp8=True).cpu()
    assert _same(decoded, codes.view(torch.float8_e4m3fn).float())


def main() -> None:
    check_all()
    print("codec kernels match the eager codec")


if __name__ == "__main__":
    main()
