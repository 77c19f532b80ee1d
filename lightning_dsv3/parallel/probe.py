"""Start-up network probe, and the two choices it feeds.

At setup (`DSV3Strategy(probe_network=True)`, the default on GPUs) every rank times the collectives
its process groups will carry (all_to_all on the expert groups; all_reduce, reduce_scatter and
all_gather on the gradient groups, as the configuration uses them) at a few payload sizes, and the
dispatch codec's encode + decode on its device. The numbers are averaged over the world and
broadcast from rank 0, so every rank holds the same table and makes the same choices: ranks that
chose differently would send mismatched collectives.

- Bucket size of the gradient reduction: the smallest probed size at which the group's collective
  reaches `BUCKET_EFFICIENCY` of the best bandwidth measured for it. Buckets that large pay little
  per-collective latency; buckets no larger let one bucket's flattening overlap the previous one's
  collective (all buckets are in flight at once).
- Dispatch compression, per payload size: the codec is used only if encoding, sending the packed
  rows and decoding takes less time than sending the rows as they are. The payload is (tokens x
  top_k) rows, the same on every rank of the ep group, so they agree without talking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_dsv3.parallel.compression import BlockCodec
from lightning_dsv3.parallel.telemetry import BandwidthTable

GPU_SIZES = (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)  # 256 KiB .. 64 MiB
CPU_SIZES = (1 << 14, 1 << 17, 1 << 20)  # 16 KiB .. 1 MiB: gloo is slow, and the probe must stay short
BUCKET_EFFICIENCY = 0.8


@dataclass(frozen=True)
class ProbeTarget:
    """A process group to time (telemetry name, group, size) and the collectives it will carry."""

    name: str
    group: dist.ProcessGroup
    size: int
    kinds: tuple[str, ...]


def probe_network(
    targets: list[ProbeTarget], device: torch.device, sizes: tuple[int, ...], iters: int
) -> BandwidthTable:
    """Time each target's collectives at `sizes` (bytes handed to the collective); collective on every rank.

    Every rank must pass the same targets (names, sizes and kinds) in the same order; groups of one
    rank are skipped. Each point is a warm-up call, which also lines the ranks up, then `iters` calls.
    """
    keys: list[tuple[str, str, int]] = []
    seconds: list[float] = []
    for target in targets:
        if target.size < 2:
            continue
        for kind in target.kinds:
            for nbytes in sizes:
                fn, sent = _collective(kind, target.group, target.size, nbytes, device)
                keys.append((target.name, kind, sent))
                seconds.append(_time(fn, device, iters))
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for (name, kind, sent), t in zip(keys, agree(seconds, device)):
        points.setdefault((name, kind), []).append((sent, sent / t / 1e9))
    return BandwidthTable(points)


def _collective(
    kind: str, group: dist.ProcessGroup, size: int, nbytes: int, device: torch.device
) -> tuple[Callable[[], object], int]:
    """A call of `kind` handing about `nbytes` of fp32 to the collective, and the exact bytes it hands."""
    numel = max(size, nbytes // 4 // size * size)  # a multiple of the group size
    x = torch.ones(numel, device=device)
    if kind == "all_to_all":
        out = torch.empty_like(x)
        return lambda: dist.all_to_all_single(out, x, group=group), 4 * numel
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group), 4 * numel
    if kind == "reduce_scatter":
        out = x.new_empty(numel // size)
        return lambda: dist.reduce_scatter_tensor(out, x, group=group), 4 * numel
    if kind == "all_gather":
        out = x.new_empty(numel * size)
        return lambda: dist.all_gather_into_tensor(out, x, group=group), 4 * numel
    raise ValueError(f"unknown collective {kind!r}")


def _time(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean seconds of one `fn()` after a warm-up call."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def agree(values: list[float], device: torch.device) -> list[float]:
    """The world's mean of each value, bit-identical on every rank (averaged, then rank 0's copy)."""
    if not values or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    dist.broadcast(t, src=0)
    return t.tolist()


@dataclass(frozen=True)
class CodecCost:
    """Encode + decode time of a block codec: fixed_s + per_byte_s * (uncompressed bytes)."""

    fixed_s: float
    per_byte_s: float

    def seconds(self, nbytes: int) -> float:
        return self.fixed_s + self.per_byte_s * nbytes


def probe_codec(
    codec: BlockCodec, dim: int, dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...], iters: int
) -> CodecCost:
    """Time pack + unpack of (rows, dim) `dtype` payloads at the two largest `sizes`; a line through them.

    Collective only in that the result is averaged over the world (`agree`), so every rank gets it.
    """
    times, nbytes = [], []
    for size in sorted(sizes)[-2:]:
        rows = max(1, size // (dim * dtype.itemsize))
        x = torch.randn(rows, dim, device=device).to(dtype)
        times.append(_time(lambda x=x: codec.unpack(codec.pack(x, False), x.shape, dtype), device, iters))
        nbytes.append(rows * dim * dtype.itemsize)
    (t0, t1), (b0, b1) = agree(times, device), nbytes
    per_byte = (t1 - t0) / (b1 - b0) if b1 > b0 and t1 > t0 else t1 / b1
    return CodecCost(fixed_s=max(0.0, t1 - per_byte * b1), per_byte_s=per_byte)


def choose_bucket_bytes(table: BandwidthTable, groups: list[str], kind: str) -> tuple[int | None, str]:
    """The bucket cap for reductions of `kind` over `groups` (see the module docstring), and why."""
    picks = []
    for group in groups:
        pts = table.points.get((group, kind))
        if not pts:
            continue
        best = max(bw for _, bw in pts)
        size, bw = next((s, bw) for s, bw in pts if bw >= BUCKET_EFFICIENCY * best)
        picks.append((size, f"{group} {kind} reaches {bw:.2f} of its best {best:.2f} GB/s at {_mib(size)}"))
    if not picks:
        return None, "no gradient group of more than one rank was probed: one bucket per group"
    size = max(s for s, _ in picks)
    return size, f"bucket cap {_mib(size)}: " + "; ".join(reason for _, reason in picks)


class DispatchCodecPolicy:
    """(uncompressed bytes, packed bytes) of a dispatch payload -> whether the codec pays (see module doc).

    Decided once per payload size; each decision is reported through `log` (rank-zero info) and kept in
    `choices` (`dispatch_codec_on`, `dispatch_codec_saving_ms` of the latest size), which the telemetry
    reports with every step.
    """

    def __init__(
        self,
        codec_name: str,
        group: str,
        table: BandwidthTable,
        cost: CodecCost,
        log: Callable[[str], None],
        choices: dict[str, float],
    ) -> None:
        self.codec_name, self.group, self.table, self.cost = codec_name, group, table, cost
        self.log, self.choices = log, choices
        self.decided: dict[int, bool] = {}

    def __call__(self, plain_bytes: int, packed_bytes: int) -> bool:
        if plain_bytes not in self.decided:
            self.decided[plain_bytes] = self._decide(plain_bytes, packed_bytes)
        return self.decided[plain_bytes]

    def _decide(self, plain_bytes: int, packed_bytes: int) -> bool:
        t_plain = self.table.seconds(self.group, "all_to_all", plain_bytes)
        t_packed = self.table.seconds(self.group, "all_to_all", packed_bytes)
        if t_plain is None or t_packed is None:
            self.log(f"{self.codec_name} dispatch on: the {self.group} all_to_all was not probed")
            return True
        t_codec = self.cost.seconds(plain_bytes)
        saving = t_plain - (t_codec + t_packed)
        use = saving > 0
        self.choices["dispatch_codec_on"] = float(use)
        self.choices["dispatch_codec_saving_ms"] = saving * 1e3
        self.log(
            f"{self.codec_name} dispatch {'on' if use else 'off'} for {_mib(plain_bytes)} payloads: "
            f"encode+decode {t_codec * 1e3:.3f} ms + packed transfer {t_packed * 1e3:.3f} ms "
            f"{'<' if use else '>='} plain transfer {t_plain * 1e3:.3f} ms ({self.group} all_to_all)"
        )
        return use


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"
