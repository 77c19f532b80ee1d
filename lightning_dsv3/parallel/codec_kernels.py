"""Fused Triton kernels for `BlockCodec.pack` / `unpack` on GPUs: one read of the payload, one write.

The eager codec runs about ten passes over fp32 temporaries (cast, abs, amax, divide, clamp, cast,
copy): on an H100 it packs and unpacks at about 5% of a device-to-device copy's rate, too slow for
FP8 dispatch to pay (benchmarks/results/codec_throughput-*). These kernels give the same bytes as the
eager code, bit for bit: each program takes `_UNITS` consecutive (row, block) units, their amax, the
scale amax / qmax rounded toward zero (IEEE division, then one ulp down, like `torch.nextafter`),
divides with IEEE division, clamps, and converts with the hardware's round-to-nearest-even fp8
conversion, as torch's cast does. Decoding widens the code and multiplies by the scale in fp32.

Two paths are kept for Triton's CPU interpreter, which the CPU tests use and which neither converts
to fp8 like a GPU nor casts pointers: there e4m3 codes are built by integer arithmetic from the value's
exponent and a round-half-to-even of its mantissa, and scales are stored byte by byte.

A NaN element encodes to a NaN code; the other elements of its block then differ from the eager
codec's (which turns the whole block into NaN): garbage in, garbage out, without a host sync.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the eager codec serves them
    triton = None

# (row, block) units per program and warps: 32 blocks of 128 channels is 8 KiB of bf16 per program,
# enough bytes in flight per SM to keep an H100's memory busy (benchmarks/results/codec_throughput-*)
_UNITS = 32
_WARPS = 4


def available(x: torch.Tensor, block_size: int) -> bool:
    """Whether the kernels can pack/unpack x: a CUDA tensor, Triton installed, a power-of-two block."""
    return triton is not None and x.is_cuda and block_size & (block_size - 1) == 0


def _native() -> bool:
    """Compiled for a GPU (True) or run by Triton's CPU interpreter (False)."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def pack(x: torch.Tensor, block_size: int, qmax: float, fp8: bool) -> torch.Tensor:
    """x (..., dim) float -> (rows, dim + 4 * n_blocks) uint8, the layout of `BlockCodec.pack`."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim).contiguous()
    n_blocks = -(-dim // block_size)
    buf = torch.empty(x2.shape[0], dim + 4 * n_blocks, dtype=torch.uint8, device=x.device)
    units = x2.shape[0] * n_blocks
    if units:
        native = _native()
        _pack_kernel[(triton.cdiv(units, _UNITS),)](
            x2, buf, dim, n_blocks, units, buf.shape[1], qmax, FP8=fp8, NATIVE=native,
            SCALE_WORDS=native and dim % 4 == 0, BS=block_size, U=_UNITS, num_warps=_WARPS,
        )  # fmt: skip
    return buf


def unpack(buf: torch.Tensor, dim: int, block_size: int, dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    """(rows, dim + 4 * n_blocks) uint8 -> (rows, dim) in `dtype`, the inverse of `pack`."""
    n_blocks = -(-dim // block_size)
    out = torch.empty(buf.shape[0], dim, dtype=dtype, device=buf.device)
    units = buf.shape[0] * n_blocks
    if units:
        native = _native()
        _unpack_kernel[(triton.cdiv(units, _UNITS),)](
            buf.contiguous(), out, dim, n_blocks, units, buf.shape[1], FP8=fp8, NATIVE=native,
            SCALE_WORDS=native and dim % 4 == 0, BS=block_size, U=_UNITS, num_warps=_WARPS,
        )  # fmt: skip
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
    def _units(U: tl.constexpr, BS: tl.constexpr, dim, n_blocks, units):
        """This program's U (row, block) units: row and block (U, 1) int64, whether the unit exists
        (U, 1), columns (U, BS) and which of them are inside the payload (U, BS)."""
        unit = tl.program_id(0).to(tl.int64) * U + tl.arange(0, U)
        row = (unit // n_blocks)[:, None]
        block = (unit % n_blocks)[:, None]
        valid = (unit < units)[:, None]
        col = block * BS + tl.arange(0, BS)[None, :]
        return row, block, valid, col, (col < dim) & valid

    @triton.jit
    def _pack_kernel(x_ptr, buf_ptr, dim, n_blocks, units, row_bytes, qmax, FP8: tl.constexpr,
                     NATIVE: tl.constexpr, SCALE_WORDS: tl.constexpr, BS: tl.constexpr,
                     U: tl.constexpr):  # fmt: skip
        row, block, valid, col, inside = _units(U, BS, dim, n_blocks, units)
        x = tl.load(x_ptr + row * dim + col, mask=inside, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # (U,); padding zeros never raise it
        scale = tl.math.div_rn(amax, qmax)
        scale = tl.where(
            scale > 0, (scale.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), scale
        )
        v = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        if FP8 and NATIVE:
            code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        elif FP8:
            code = _e4m3_code(v).to(tl.uint8)
        else:
            code = (_rint(v).to(tl.int32) & 0xFF).to(tl.uint8)  # two's complement byte of the int8 code
        row_ptr = buf_ptr + row * row_bytes
        tl.store(row_ptr + col, code, mask=inside)
        if SCALE_WORDS:  # rows of dim % 4 == 0 keep every scale 4-byte aligned: one fp32 store each
            tl.store((row_ptr + dim + block * 4).to(tl.pointer_type(tl.float32)), scale[:, None], mask=valid)
        else:  # little-endian fp32 bytes, as `view(uint8)` lays them out
            byte = tl.arange(0, 4)[None, :]
            bits = scale.to(tl.int32, bitcast=True)[:, None]
            tl.store(row_ptr + dim + block * 4 + byte, ((bits >> (8 * byte)) & 0xFF).to(tl.uint8),
                     mask=valid)  # fmt: skip

    @triton.jit
    def _unpack_kernel(buf_ptr, out_ptr, dim, n_blocks, units, row_bytes, FP8: tl.constexpr,
                       NATIVE: tl.constexpr, SCALE_WORDS: tl.constexpr, BS: tl.constexpr,
                       U: tl.constexpr):  # fmt: skip
        row, block, valid, col, inside = _units(U, BS, dim, n_blocks, units)
        row_ptr = buf_ptr + row * row_bytes
        c = tl.load(row_ptr + col, mask=inside, other=0)
        if FP8 and NATIVE:
            value = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        elif FP8:
            value = _e4m3_value(c.to(tl.int32))
        else:
            value = c.to(tl.int8, bitcast=True).to(tl.float32)
        if SCALE_WORDS:
            scale = tl.load(
                (row_ptr + dim + block * 4).to(tl.pointer_type(tl.float32)), mask=valid, other=0.0
            )
        else:
            byte = tl.arange(0, 4)[None, :]
            parts = tl.load(row_ptr + dim + block * 4 + byte, mask=valid, other=0).to(tl.int32)
            scale = tl.sum(parts << (8 * byte), axis=1, keep_dims=True).to(tl.float32, bitcast=True)
        tl.store(out_ptr + row * dim + col, (value * scale).to(out_ptr.dtype.element_ty), mask=inside)
