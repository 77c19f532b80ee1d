"""Encode and decode throughput of the dispatch codecs against a device-to-device copy of the payload.

A payload is (rows, dim) activations in the compute dtype, as the expert dispatch sends them. For each
size it times `pack` (codes + per-128-channel scales into one uint8 row), `unpack`, and both, and a
plain `copy_` of the same tensor; throughput is payload bytes (uncompressed) per second. The issue's
bar: encode+decode at >= 70% of the copy's rate from 64 MiB up. On a GPU with Triton the codec runs
its fused kernels (`lightning_dsv3.parallel.codec_kernels`, rows "triton"); rows "eager" time the same
codec with the kernels switched off, the torch-ops path every other device uses.

    python -m benchmarks.codec_throughput                                  # GPU: 1 MiB .. 1 GiB, bf16
    python -m benchmarks.codec_throughput --max-mib 4 --dim 512 --reps 3  # CPU small mode
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch

from benchmarks.results_io import (
    markdown_table,
    median_ms,
    payload_sizes_mib,
    payload_sweep_parser,
    write_result,
)
from lightning_dsv3.parallel import codec_kernels
from lightning_dsv3.parallel.compression import BlockCodec, get_codec


def round_trip(codec: BlockCodec, x: torch.Tensor) -> torch.Tensor:
    return codec.unpack(codec.pack(x, check_finite=False), x.shape, x.dtype)


@contextmanager
def kernels(enabled: bool) -> Iterator[None]:
    """Run the codec with its fused kernels where available (True) or on torch ops only (False)."""
    available = codec_kernels.available
    if not enabled:
        codec_kernels.available = lambda *args: False
    try:
        yield
    finally:
        codec_kernels.available = available


def main() -> None:
    parser = payload_sweep_parser(__doc__)
    parser.add_argument(
        "--dtype", default=None, help="payload dtype (default: bfloat16 on GPU, float32 on CPU)"
    )
    parser.add_argument("--codecs", nargs="+", default=["fp8", "int8"])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    fused = codec_kernels.available(torch.empty(0, device=device), 128)
    rows = []
    for mib in payload_sizes_mib(args):
        n_rows = max(1, mib * 2**20 // (args.dim * dtype.itemsize))
        x = torch.randn(n_rows, args.dim, device=device).to(dtype)
        nbytes = x.numel() * x.element_size()
        copy_gbps = nbytes / median_ms(partial(torch.empty_like(x).copy_, x), device, args.reps) / 1e6
        for name in args.codecs:
            codec = get_codec(name)
            for kernel in [True, False] if fused else [False]:
                with kernels(kernel):
                    enc = median_ms(partial(codec.pack, x, check_finite=False), device, args.reps)
                    dec = median_ms(partial(codec.unpack, codec.pack(x), x.shape, dtype), device, args.reps)
                    both = median_ms(partial(round_trip, codec, x), device, args.reps)
                rates = [nbytes / ms / 1e6 for ms in (enc, dec, both)]
                ratio = codec.compression_ratio(args.dim, dtype)
                # a round trip reads and writes the payload and the packed buffer once each,
                # 2 * nbytes * (1 + 1/ratio) bytes; a copy moves 2 * nbytes
                traffic = (1 + 1 / ratio) * rates[2] / copy_gbps
                rows.append(
                    [mib, f"{name} ({'triton' if kernel else 'eager'})", *(f"{r:.1f}" for r in rates),
                     f"{copy_gbps:.1f}", f"{rates[2] / copy_gbps:.0%}", f"{traffic:.0%}", f"{ratio:.2f}"]
                )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = ["payload MiB", "codec", "encode GB/s", "decode GB/s", "encode+decode GB/s", "copy GB/s",
              "encode+decode / copy", "bandwidth / copy's", "bytes ratio"]  # fmt: skip
    body = (
        f"rows of {args.dim} channels in {str(dtype).removeprefix('torch.')}, one fp32 scale per 128 "
        "channels; GB/s = uncompressed payload bytes / time (10^9 bytes/s), medians of "
        f'{args.reps} runs; copy = `dst.copy_(x)` of the same payload. "bandwidth / copy\'s" counts the '
        "bytes each moves through device memory (a round trip reads and writes the payload and the packed "
        "buffer, 2 x (1 + 1/ratio) x payload; a copy 2 x payload): at the copy's bandwidth a round trip "
        "runs at ratio / (1 + ratio) = 66% of the copy's payload rate at 1.94x, its physical ceiling\n\n"
        + markdown_table(header, rows)
    )
    write_result("codec_throughput", body)


if __name__ == "__main__":
    main()
