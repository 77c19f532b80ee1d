"""Expert dispatch + combine: bf16 and FP8 dispatch against a plain all_to_all_single, per payload size.

Every rank holds `payload` bytes of dispatch rows (tokens x top_k rows of `dim` channels, bf16 on GPUs),
each routed to a uniformly random expert of any rank, sorted by expert as the MoE layer sorts them.
Three ways to send them to the experts' ranks and back:
- all_to_all_single: the rows in equal splits there and back, nothing else (the floor);
- bf16: `AllToAllDispatcher.dispatch` + `combine` as the strategy runs them (count exchange, split
  sizes read on the host, rows re-sorted by local expert);
- fp8: the same with the dispatch payload packed by `Fp8BlockCodec` (the combine stays bf16).
ms is one dispatch + combine (forward), the median over reps of the slowest rank; GB/s is the bytes
this rank hands to the collectives (10^9 bytes/s) over that time.

    torchrun --nproc-per-node 8 -m benchmarks.dispatch                          # GPUs, NCCL, 1 MiB .. 1 GiB
    torchrun --nproc-per-node 2 -m benchmarks.dispatch --max-mib 4 --dim 512    # CPU small mode, gloo
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from benchmarks.results_io import markdown_table, payload_sizes_mib, payload_sweep_parser, write_result
from lightning_dsv3.parallel.compression import Fp8BlockCodec
from lightning_dsv3.parallel.expert import AllToAllDispatcher
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median ms of `fn()` after two warm-up calls; the maximum over ranks (the slowest sets the pace)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def bench_size(
    mib: int, args: argparse.Namespace, link: Link, device: torch.device, dtype: torch.dtype
) -> list[list[object]]:
    """The three ways at a payload of `mib` MiB per rank: one table row each."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n_experts = world * args.experts_per_rank
    plain = AllToAllDispatcher(link, world, args.experts_per_rank)
    fp8 = AllToAllDispatcher(link, world, args.experts_per_rank, codec=Fp8BlockCodec())
    n_rows = max(world, mib * 2**20 // (args.dim * dtype.itemsize)) // world * world
    gen = torch.Generator().manual_seed(rank)
    expert = torch.randint(0, n_experts, (n_rows,), generator=gen).sort().values.to(device)
    counts = torch.bincount(expert, minlength=n_experts)
    tokens = torch.randn(n_rows, args.dim, device=device).to(dtype)
    out = torch.empty_like(tokens)
    payload = tokens.numel() * tokens.element_size()

    def a2a() -> None:
        dist.all_to_all_single(out, tokens)
        dist.all_to_all_single(tokens, out)

    def dispatch_combine(dispatcher: AllToAllDispatcher) -> None:
        received, _, ctx = dispatcher.dispatch(tokens, counts)
        dispatcher.combine(received, ctx)

    with torch.no_grad():
        base = time_ms(a2a, device, args.reps)
        bf16 = time_ms(lambda: dispatch_combine(plain), device, args.reps)
        packed = time_ms(lambda: dispatch_combine(fp8), device, args.reps)
    modes = [
        ("all_to_all_single", base, 2 * payload),
        (str(dtype).removeprefix("torch."), bf16, 2 * payload),
        ("fp8 dispatch", packed, fp8.codec.nbytes(tokens.shape) + payload),  # packed there, bf16 back
    ]
    return [
        [mib, mode, f"{ms:.3f}", f"{nbytes / ms / 1e6:.2f}", f"{base / ms:.2f}x"]
        for mode, ms, nbytes in modes
    ]


def main() -> None:
    parser = payload_sweep_parser(__doc__)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    link = Link(dist.group.WORLD, "ep", CommTelemetry(device, enabled=False))
    rows = []
    for mib in payload_sizes_mib(args):
        rows += bench_size(mib, args, link, device, dtype)
        if cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        backend = dist.get_backend()
        body = (
            f"launched as `torchrun --nproc-per-node {world} -m benchmarks.dispatch` ({backend}); rows of "
            f"{args.dim} channels, {args.experts_per_rank} experts per rank, uniform routing; "
            "payload = dispatch rows per rank\n\n"
            + markdown_table(["payload MiB", "mode", "ms", "GB/s per rank", "vs all_to_all_single"], rows)
        )
        write_result("dispatch", body)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
