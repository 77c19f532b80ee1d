"""Expert dispatch + combine: bf16 and FP8 dispatch against a plain all_to_all_single, per payload size.

Every rank holds `payload` bytes of dispatch rows (tokens x top_k rows of `dim` channels, bf16 on GPUs),
each routed to a uniformly random expert of any rank, sorted by expert as the MoE layer sorts them.
Three ways to send them to the experts' ranks and back:
- all_to_all_single: the rows in equal splits there and back, nothing else (the floor);
- bf16: `AllToAllDispatcher.dispatch` + `combine` as the strategy runs them (count exchange, split
  sizes read on the host once, rows regrouped by local expert and back in one block transpose each);
- fp8: the same with the dispatch payload packed by `Fp8BlockCodec` (the combine stays bf16).
ms is one dispatch + combine (forward), the median over reps of the slowest rank; GB/s is the bytes
this rank hands to the collectives (10^9 bytes/s) over that time.

`--breakdown` adds, at every size, the same dispatch + combine taken apart (each part timed alone, as
above): the payload's two all_to_all_single calls with the dispatch's own variable splits known
beforehand; those plus the two block transposes (all of a call but its count exchange); the count
exchange with its host read alone. What the full call costs beyond the parts is the host waiting.

`--nvshmem` adds the library's device-initiated exchange at every size: torch's NVSHMEM
`symm_mem.all_to_all_vdev_2d` there and `all_to_all_vdev_2d_offset` back, on symmetric buffers (the
splits stay on the device and the rows land grouped by local expert: no count exchange read on the
host and no transposes, the two costs `--breakdown` shows), checked to return every row exactly.

`--profile MIB` adds torch.profiler's view of a few bf16 dispatch + combine calls at MIB MiB: the host
ops and device kernels that take the most time per call, and the share of the call the host spends
outside any op (Python and waiting), to attribute the fixed cost; `--trace` keeps each rank's
timeline (an NCCL kernel also runs while it waits for the slowest rank's host to launch its half).

    torchrun --nproc-per-node 8 -m benchmarks.dispatch                          # GPUs, NCCL, 1 MiB .. 1 GiB
    torchrun --nproc-per-node 2 -m benchmarks.dispatch --max-mib 64 --min-mib 64 --profile 64
    torchrun --nproc-per-node 2 -m benchmarks.dispatch --max-mib 4 --dim 512    # CPU small mode, gloo
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import SYNC_OPS, device_kernels
from benchmarks.results_io import markdown_table, payload_sizes_mib, payload_sweep_parser, write_result
from lightning_dsv3.parallel.compression import Fp8BlockCodec
from lightning_dsv3.parallel.expert import AllToAllDispatcher, move_rows
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link

PROFILED_CALLS = 5


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


def routed_rows(
    mib: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's `mib` MiB of dispatch rows (rows, dim), each routed to a uniformly random expert and
    sorted by expert as the MoE layer sorts them, and the rows per expert (world * experts_per_rank,)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n_experts = world * args.experts_per_rank
    n_rows = max(world, mib * 2**20 // (args.dim * dtype.itemsize)) // world * world
    gen = torch.Generator().manual_seed(rank)
    expert = torch.randint(0, n_experts, (n_rows,), generator=gen).sort().values.to(device)
    counts = torch.bincount(expert, minlength=n_experts)
    tokens = torch.randn(n_rows, args.dim, device=device).to(dtype)
    return tokens, counts


def dispatch_combine(dispatcher: AllToAllDispatcher, tokens: torch.Tensor, counts: torch.Tensor) -> None:
    received, _, ctx = dispatcher.dispatch(tokens, counts)
    dispatcher.combine(received, ctx)


def breakdown_rows(
    mib: int, args: argparse.Namespace, link: Link, device: torch.device, dtype: torch.dtype, base: float
) -> list[list[object]]:
    """The bf16 dispatch + combine at `mib` MiB taken apart, one table row per part (ms against `base`,
    the plain pair's ms): splits known beforehand, then transposes added, then the count exchange alone."""
    world = dist.get_world_size()
    dispatcher = AllToAllDispatcher(link, world, args.experts_per_rank)
    tokens, counts = routed_rows(mib, args, device, dtype)
    _, _, plan = dispatcher.dispatch(tokens, counts)  # the splits, read once here

    def payload_only() -> None:
        received = link.all_to_all(tokens, plan.recv_splits, plan.send_splits, "dispatch")
        link.all_to_all(received, plan.send_splits, plan.recv_splits, "combine")

    def with_transposes() -> None:
        received = move_rows(tokens, link, plan, True, None, "dispatch")
        move_rows(received, link, plan, False, None, "combine")

    def counts_only() -> None:
        link.all_to_all_equal(counts, "dispatch_counts").tolist()

    parts = [
        ("payload all_to_all x2, splits known", payload_only),
        ("+ block transposes (no count exchange)", with_transposes),
        ("count exchange + host read alone", counts_only),
    ]
    rows = []
    with torch.no_grad():
        for name, fn in parts:
            ms = time_ms(fn, device, args.reps)
            rows.append([mib, name, f"{ms:.3f}", "", f"{base / ms:.2f}x"])
    return rows


def enable_nvshmem(device: torch.device) -> None:
    """torch's symmetric memory on NVSHMEM for this process (before the first symmetric tensor)."""
    if device.type != "cuda" or not symm_mem.is_nvshmem_available():
        raise SystemExit("--nvshmem needs CUDA devices and a torch build whose NVSHMEM library loads")
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "8G")  # dispatch, receive and return buffers at 512 MiB
    symm_mem.set_backend("NVSHMEM")


def nvshmem_row(
    mib: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, base: float
) -> list:
    """NVSHMEM dispatch + combine of the same routed rows (ms against `base`, the plain pair's ms)."""
    world, group = dist.get_world_size(), dist.group.WORLD.group_name
    tokens, counts = routed_rows(mib, args, device, dtype)
    rows, dim = tokens.shape

    def symmetric(shape: tuple[int, ...], like: torch.dtype) -> torch.Tensor:
        t = symm_mem.empty(shape, dtype=like, device=device)
        symm_mem.rendezvous(t, group=group)
        return t

    sent, back = symmetric((rows, dim), dtype), symmetric((rows, dim), dtype)
    received = symmetric((rows * world, dim), dtype)  # every row could go to one rank
    splits = symmetric((world * args.experts_per_rank,), torch.int64)
    arrived, returned = (symmetric((2, world * args.experts_per_rank), torch.int64) for _ in range(2))
    sent.copy_(tokens)
    splits.copy_(counts)

    def exchange() -> None:
        torch.ops.symm_mem.all_to_all_vdev_2d(sent, received, splits, arrived, group)
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(received, back, arrived, returned, group)

    with torch.no_grad():
        ms = time_ms(exchange, device, args.reps)
    exact = torch.equal(back, tokens) and torch.equal(returned[0], counts)
    if not exact:
        raise RuntimeError(f"NVSHMEM dispatch + combine at {mib} MiB did not return every row")
    payload = tokens.numel() * tokens.element_size()
    return [
        mib,
        "NVSHMEM all_to_all_vdev_2d",
        f"{ms:.3f}",
        f"{2 * payload / ms / 1e6:.2f}",
        f"{base / ms:.2f}x",
    ]


def bench_size(
    mib: int, args: argparse.Namespace, link: Link, device: torch.device, dtype: torch.dtype
) -> list[list[object]]:
    """The three ways at a payload of `mib` MiB per rank: one table row each."""
    world = dist.get_world_size()
    plain = AllToAllDispatcher(link, world, args.experts_per_rank)
    fp8 = AllToAllDispatcher(link, world, args.experts_per_rank, codec=Fp8BlockCodec())
    tokens, counts = routed_rows(mib, args, device, dtype)
    out = torch.empty_like(tokens)
    payload = tokens.numel() * tokens.element_size()

    def a2a() -> None:
        dist.all_to_all_single(out, tokens)
        dist.all_to_all_single(tokens, out)

    with torch.no_grad():
        base = time_ms(a2a, device, args.reps)
        bf16 = time_ms(lambda: dispatch_combine(plain, tokens, counts), device, args.reps)
        packed = time_ms(lambda: dispatch_combine(fp8, tokens, counts), device, args.reps)
    modes = [
        ("all_to_all_single", base, 2 * payload),
        (str(dtype).removeprefix("torch."), bf16, 2 * payload),
        ("fp8 dispatch", packed, fp8.codec.nbytes(tokens.shape) + payload),  # packed there, bf16 back
    ]
    rows = [
        [mib, mode, f"{ms:.3f}", f"{nbytes / ms / 1e6:.2f}", f"{base / ms:.2f}x"]
        for mode, ms, nbytes in modes
    ]
    if args.breakdown:
        rows += breakdown_rows(mib, args, link, device, dtype, base)
    if args.nvshmem:
        rows.append(nvshmem_row(mib, args, device, dtype, base))
    return rows


def profile_size(
    mib: int, args: argparse.Namespace, link: Link, device: torch.device, dtype: torch.dtype
) -> str:
    """torch.profiler over PROFILED_CALLS uncompressed dispatch + combine calls at `mib` MiB (every rank
    runs them; rank 0's view is returned): per call, the host ops and the device kernels that take the
    most time, and how much of the call the host spends outside any op (Python and waiting)."""
    dispatcher = AllToAllDispatcher(link, dist.get_world_size(), args.experts_per_rank)
    tokens, counts = routed_rows(mib, args, device, dtype)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for _ in range(2):
            dispatch_combine(dispatcher, tokens, counts)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(PROFILED_CALLS):
                dispatch_combine(dispatcher, tokens, counts)
            if cuda:
                torch.cuda.synchronize(device)
            call_us = (time.perf_counter() - start) / PROFILED_CALLS * 1e6
    if args.trace:  # every rank's: a call waits on the slowest rank, whose host timeline explains it
        path = Path(args.trace)
        prof.export_chrome_trace(str(path.with_name(f"{path.stem}-rank{dist.get_rank()}{path.suffix}")))
    averages = prof.key_averages()
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops_us = sum(e.self_cpu_time_total for e in host) / PROFILED_CALLS
    syncs = sum(e.count for e in host if e.key in SYNC_OPS) / PROFILED_CALLS
    name = str(dtype).removeprefix("torch.")
    text = (
        f"profile: {PROFILED_CALLS} {name} dispatch + combine calls at {mib} MiB, "
        f"{call_us:.0f} us per call (profiled); host time inside ops {in_ops_us:.0f} us per call, the rest "
        f"is Python and waiting; host syncs per call: {syncs:g}\n\n"
        + _top_table("host op", host, "self_cpu_time_total", args.top)
    )
    if cuda:
        kernels = sorted(device_kernels(averages), key=lambda e: e.self_device_time_total, reverse=True)
        busy_us = sum(e.self_device_time_total for e in kernels) / PROFILED_CALLS
        text += (
            f"\n\ndevice kernels: {busy_us:.0f} us per call ({busy_us / call_us:.0%} of the call)\n\n"
            + _top_table("kernel", kernels, "self_device_time_total", args.top)
        )
    return text


def _top_table(what: str, events: list, key: str, top: int) -> str:
    rows = [
        [e.key[:70], f"{getattr(e, key) / PROFILED_CALLS:.1f}", f"{e.count / PROFILED_CALLS:g}"]
        for e in events[:top]
    ]
    return markdown_table([what, "us per call", "calls per call"], rows)


def main() -> None:
    parser = payload_sweep_parser(__doc__)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--breakdown", action="store_true", help="also time the bf16 call's parts")
    parser.add_argument("--nvshmem", action="store_true", help="also torch's NVSHMEM exchange (GPUs only)")
    parser.add_argument("--profile", type=int, default=None, metavar="MIB", help="also profile at MIB MiB")
    parser.add_argument("--top", type=int, default=15, help="with --profile: rows per table")
    parser.add_argument(
        "--trace",
        default=None,
        help="with --profile: each rank's Chrome trace, at PATH with -rankN before the suffix",
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.nvshmem:
        enable_nvshmem(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32
    link = Link(dist.group.WORLD, "ep", CommTelemetry(device, enabled=False))
    rows = []
    for mib in payload_sizes_mib(args):
        rows += bench_size(mib, args, link, device, dtype)
        if cuda:
            torch.cuda.empty_cache()
    profiled = "" if args.profile is None else "\n\n" + profile_size(args.profile, args, link, device, dtype)
    if rank == 0:
        backend = dist.get_backend()
        body = (
            f"launched as `torchrun --nproc-per-node {world} -m benchmarks.dispatch` ({backend}); rows of "
            f"{args.dim} channels, {args.experts_per_rank} experts per rank, uniform routing; "
            "payload = dispatch rows per rank\n\n"
            + markdown_table(["payload MiB", "mode", "ms", "GB/s per rank", "vs all_to_all_single"], rows)
            + profiled
        )
        write_result("dispatch", body)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
