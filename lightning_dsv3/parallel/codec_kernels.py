"""Fused Triton kernels for `BlockCodec.pack` / `unpack` on GPUs: one read of the payload, one write.

The eager codec runs about ten passes over fp32 temporaries (cast, abs, amax, divide, clamp, cast,
copy): on an H100 it packs and unpacks at about 5% of a device-to-device copy's rate, too slow for
FP8 dispatch to pay (benchmarks/results/codec_throughput-*). These kernels give the same bytes as the
eager code, bit for bit: each program loads G blocks of one row, takes their amax, the scale
amax / qmax rounded toward zero (IEEE division, then one ulp down, like `torch.nextafter`), divides
with IEEE division, clamps, and rounds to the code by integer arithmetic: e4m3 codes are built from
the value's exponent and a round-half-to-even of its mantissa, so the result does not depend on how
a backend converts to float8 (Triton's CPU interpreter, which the tests use, rounds differently).
Decoding rebuilds the value from the code's bits and multiplies by the scale in fp32, as eager does.

A NaN element encodes to a NaN code; the other elements of its block then differ from the eager
codec's (which turns the whole block into NaN): garbage in, garbage out, without a host sync.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the eager codec serves them
    triton = None

_G = 8  # blocks per program: 1024 channels of one row at block size 128


def available(x: torch.Tensor, block_size: int) -> bool:
    """Whether the kernels can pack/unpack x: a CUDA tensor, Triton installed, a power-of-two block."""
    return triton is not None and x.is_cuda and block_size & (block_size - 1) == 0


def pack(x: torch.Tensor, block_size: int, qmax: float, fp8: bool) -> torch.Tensor:
    """x (..., dim) float -> (rows, dim + 4 * n_blocks) uint8, the layout of `BlockCodec.pack`."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim).contiguous()
    n_blocks = -(-dim // block_size)
    buf = torch.empty(x2.shape[0], dim + 4 * n_blocks, dtype=torch.uint8, device=x.device)
    if x2.shape[0] and n_blocks:
        grid = (x2.shape[0], triton.cdiv(n_blocks, _G))
        _pack_kernel[grid](x2, buf, dim, n_blocks, buf.shape[1], qmax, FP8=fp8, BS=block_size, G=_G)
    return buf


def unpack(buf: torch.Tensor, dim: int, block_size: int, dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    """(rows, dim + 4 * n_blocks) uint8 -> (rows, dim) in `dtype`, the inverse of `pack`."""
    n_blocks = -(-dim // block_size)
    out = torch.empty(buf.shape[0], dim, dtype=dtype, device=buf.device)
    if buf.shape[0] and n_blocks:
        grid = (buf.shape[0], triton.cdiv(n_blocks, _G))
        _unpack_kernel[grid](buf.contiguous(), out, dim, n_blocks, buf.shape[1], FP8=fp8, BS=block_size, G=_G)
    return out


if triton is not None:

    @triton.jit
    def _pow2(e):
        """2^e as fp32 for integer e in the normal range, built from its bits (exact)."""
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _rint(y):
        """Round fp32 |y| < 2^22 to the nearest integer, ties to even: adding and removing 1.5 * 2^23 leaves
        no fraction bits, and IEEE addition rounds half to even (no libdevice: the interpreter lacks it)."""
        magic = 12582912.0  # 1.5 * 2^23
        return (y + magic) - magic

    @triton.jit
    def _e4m3_code(v):
        """v (fp32, |v| <= 448) -> float8_e4m3fn bits (int32 in [0, 255]), rounded half to even."""
        sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
        a = tl.abs(v)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals share 2^-6
        m = _rint(a * _pow2(3 - e))  # a in units of 2^(e-3): 3 mantissa bits
        r = m * _pow2(e - 3)  # |v| rounded (exact); m = 16 carries into the next binade by itself
        rb = r.to(tl.int32, bitcast=True)
        re = ((rb >> 23) & 0xFF) - 127
        code = tl.where(re >= -6, ((re + 7) << 3) | ((rb >> 20) & 7), m.to(tl.int32))  # normal | subnormal
        code = tl.where(r == 0, 0, code)
        code = tl.where(v != v, 0x7F, code)
        return code | (sign << 7)

    @triton.jit
    def _e4m3_value(c):
        """float8_e4m3fn bits (int32) -> fp32 value."""
        exp = (c >> 3) & 15
        man = c & 7
        mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, (man + 8).to(tl.float32) * _pow2(exp - 10))
        mag = tl.where((exp == 15) & (man == 7), float("nan"), mag)
        return tl.where(((c >> 7) & 1) == 1, -mag, mag)

    @triton.jit
    def _pack_kernel(x_ptr, buf_ptr, dim, n_blocks, row_bytes, qmax, FP8: tl.constexpr, BS: tl.constexpr,
                     G: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1) * G + tl.arange(0, G)  # (G,)
        col = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # (G, BS)
        inside = (col < dim) & (blk[:, None] < n_blocks)
        x = tl.load(x_ptr + row * dim + col, mask=inside, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # (G,); padding zeros never raise it
        scale = tl.math.div_rn(amax, qmax)
        scale = tl.where(
            scale > 0, (scale.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), scale
        )
        v = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        if FP8:
            code = _e4m3_code(v)
        else:
            code = _rint(v).to(tl.int32) & 0xFF  # two's complement byte of the int8 code
        row_ptr = buf_ptr + row * row_bytes
        tl.store(row_ptr + col, code.to(tl.uint8), mask=inside)
        bits = scale.to(tl.int32, bitcast=True)
        byte = tl.arange(0, 4)
        scale_bytes = (bits[:, None] >> (8 * byte[None, :])) & 0xFF  # little-endian fp32, as `view(uint8)`
        tl.store(row_ptr + dim + blk[:, None] * 4 + byte[None, :], scale_bytes.to(tl.uint8),
                 mask=blk[:, None] < n_blocks)  # fmt: skip

    @triton.jit
    def _unpack_kernel(buf_ptr, out_ptr, dim, n_blocks, row_bytes, FP8: tl.constexpr, BS: tl.constexpr,
                       G: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1) * G + tl.arange(0, G)
        col = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        inside = (col < dim) & (blk[:, None] < n_blocks)
        row_ptr = buf_ptr + row * row_bytes
        c = tl.load(row_ptr + col, mask=inside, other=0).to(tl.int32)
        if FP8:
            value = _e4m3_value(c)
        else:
            value = (((c + 128) & 0xFF) - 128).to(tl.float32)
        scale_ptr = row_ptr + dim + blk * 4
        valid = blk < n_blocks
        bits = tl.load(scale_ptr, mask=valid, other=0).to(tl.int32)
        for k in tl.static_range(1, 4):
            bits = bits | (tl.load(scale_ptr + k, mask=valid, other=0).to(tl.int32) << (8 * k))
        out = value * bits.to(tl.float32, bitcast=True)[:, None]
        tl.store(out_ptr + row * dim + col, out.to(out_ptr.dtype.element_ty), mask=inside)
