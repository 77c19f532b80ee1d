"""Communication telemetry: bytes, time and bandwidth of every collective the strategy issues.

Collectives go through a `Link` (a process group, the name its traffic is filed under, and the
telemetry), which records each call: bytes before compression, bytes handed to the collective, and
its start and end (CUDA events on GPUs, recorded on the current stream; wall clock on CPUs). An
asynchronous call ends when its `wait()` returns. Nothing is read back during the step: events are
resolved when `CommTelemetry.stats()` is asked for the last finished optimizer step, once.

Conventions, per rank and per optimizer step:
- bytes: what the payload would take uncompressed (for an all_to_all, the rows this rank sends,
  its own slice included; for a reduction, the tensor it contributes).
- bytes_sent: the size of the tensor actually handed to the collective (codes + scales, top-k
  values + indices, PowerSGD's P and Q).
- time_ms: the union of the calls' [start, end] intervals (in-flight calls overlap; the union does
  not count a millisecond twice). Encoding and decoding are outside these intervals: this is the
  time on the wire, so that gbps compares with the probe's peak.
- gbps: bytes_sent / time, in GB/s (10^9 bytes/s), the "algorithm bandwidth" of NCCL's tests.
- peak_gbps: the bandwidth the start-up probe measured for the same group and collective at the
  calls' sizes (interpolated in log size): bytes_sent over the sum of each call's probed time.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dsv3.faults import collective


class BandwidthTable:
    """Measured algorithm bandwidth (GB/s) per (group name, collective) at a few payload sizes."""

    def __init__(self, points: dict[tuple[str, str], list[tuple[int, float]]]) -> None:
        self.points = {key: sorted(pts) for key, pts in points.items() if pts}

    def gbps(self, group: str, kind: str, nbytes: int) -> float | None:
        """Bandwidth at `nbytes`, interpolated linearly in log2(size), clamped to the probed range."""
        pts = self.points.get((group, kind))
        if not pts:
            return None
        sizes = [s for s, _ in pts]
        if nbytes <= sizes[0]:
            return pts[0][1]
        if nbytes >= sizes[-1]:
            return pts[-1][1]
        i = bisect.bisect_right(sizes, nbytes)
        (s0, g0), (s1, g1) = pts[i - 1], pts[i]
        w = (math.log2(nbytes) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
        return g0 + w * (g1 - g0)

    def seconds(self, group: str, kind: str, nbytes: int) -> float | None:
        """Predicted time of one call moving `nbytes`; None if this collective was not probed."""
        bw = self.gbps(group, kind, nbytes)
        return None if bw is None or bw <= 0 else nbytes / (bw * 1e9)


@dataclass
class _Call:
    group: str
    op: str
    kind: str  # the collective ("all_to_all", "all_reduce", ...), for the probed peak
    nbytes: int
    nbytes_sent: int
    start: Any  # float seconds, or a torch.cuda.Event
    end: Any = None


@dataclass
class CommTelemetry:
    """Collects every call of one optimizer step; `stats()` returns the last finished step's metrics.

    `enabled` is switched off by the strategy during validation, so a step's numbers are its own.
    `choices` holds the adaptive choices (numbers) made at start-up, reported with every step.
    """

    device: torch.device
    enabled: bool = True
    peaks: BandwidthTable | None = None
    choices: dict[str, float] = field(default_factory=dict)
    _calls: list[_Call] = field(default_factory=list, init=False)
    _last: list[_Call] = field(default_factory=list, init=False)
    _stats: dict[str, float] | None = field(default=None, init=False)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    @torch.compiler.disable  # traced into a compiled layer (whose MoE dispatches), the event kept here
    def _now(self) -> Any:  # would not be the one the graph records, and reading it would fail
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, group: str, op: str, kind: str, nbytes: int, nbytes_sent: int) -> _Call | None:
        """Open a record for one call (None while disabled); `stop` closes it."""
        if not self.enabled:
            return None
        call = _Call(group, op, kind, int(nbytes), int(nbytes_sent), self._now())
        self._calls.append(call)
        return call

    def stop(self, call: _Call | None) -> None:
        if call is not None:
            call.end = self._now()

    @contextmanager
    def span(self, group: str, op: str, kind: str, nbytes: int, nbytes_sent: int) -> Iterator[None]:
        call = self.start(group, op, kind, nbytes, nbytes_sent)
        yield
        self.stop(call)

    def end_step(self) -> None:
        """Close the optimizer step: its calls become what `stats()` reports."""
        self._last, self._calls, self._stats = self._calls, [], None

    def stats(self) -> dict[str, float]:
        """The last finished step's metrics (see `DSV3Strategy.communication_stats` for the names)."""
        if self._stats is None:
            self._stats = self._summarise(self._last)
        return {**self._stats, **{f"comm/choice/{k}": v for k, v in self.choices.items()}}

    def _summarise(self, calls: list[_Call]) -> dict[str, float]:
        calls = [c for c in calls if c.end is not None]
        if not calls:
            return {}
        intervals = self._intervals_ms(calls)
        keys: dict[str, list[int]] = {}
        for i, c in enumerate(calls):
            keys.setdefault(f"{c.group}.{c.op}", []).append(i)
        out: dict[str, float] = {}
        for key, idx in sorted(keys.items()):
            out.update(self._metrics(f"comm/{key}", [calls[i] for i in idx], [intervals[i] for i in idx]))
        out.update(self._metrics("comm/total", calls, intervals, with_peak=False))
        return out

    def _metrics(
        self, prefix: str, calls: list[_Call], intervals: list[tuple[float, float]], with_peak: bool = True
    ) -> dict[str, float]:
        nbytes = sum(c.nbytes for c in calls)
        sent = sum(c.nbytes_sent for c in calls)
        ms = _union_ms(intervals)
        out = {
            f"{prefix}/bytes": float(nbytes),
            f"{prefix}/bytes_sent": float(sent),
            f"{prefix}/time_ms": ms,
            f"{prefix}/gbps": sent / (ms * 1e6) if ms > 0 else 0.0,
            f"{prefix}/compression_ratio": nbytes / sent if sent else 1.0,
            f"{prefix}/calls": float(len(calls)),
        }
        if with_peak and self.peaks is not None:
            ideal = [self.peaks.seconds(c.group, c.kind, c.nbytes_sent) for c in calls if c.nbytes_sent]
            if ideal and all(t is not None for t in ideal):
                out[f"{prefix}/peak_gbps"] = sent / (sum(ideal) * 1e9)
        return out

    def _intervals_ms(self, calls: list[_Call]) -> list[tuple[float, float]]:
        """(start, end) of each call in ms from the step's first call; waits for each call's end event (the
        calls may have been issued from different streams)."""
        if not self._cuda:
            t0 = calls[0].start
            return [((c.start - t0) * 1e3, (c.end - t0) * 1e3) for c in calls]
        origin = calls[0].start
        for c in calls:
            c.end.synchronize()
        return [(origin.elapsed_time(c.start), origin.elapsed_time(c.end)) for c in calls]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


class _Pending:
    """An asynchronous collective whose record closes when it is waited for."""

    def __init__(self, work: Any, telemetry: CommTelemetry, call: _Call | None) -> None:
        self.work, self.telemetry, self.call = work, telemetry, call

    def wait(self) -> None:
        self.work.wait()
        self.telemetry.stop(self.call)


@dataclass(frozen=True)
class Link:
    """A process group, the name telemetry files its traffic under, and the telemetry.

    Every collective of the strategy's data path goes through one of these methods. `nbytes` is the
    payload's uncompressed size when the tensor passed is an encoded form of it (default: its size).
    The all-to-alls (the expert exchange, flat or in two hops) block, so a failure or timeout of one
    surfaces as a `faults.CollectiveError` naming the operation, this link's group and its ranks.
    """

    group: dist.ProcessGroup | None
    name: str
    telemetry: CommTelemetry

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def all_to_all(
        self, x: Tensor, out_splits: list[int], in_splits: list[int], op: str, nbytes: int | None = None
    ) -> Tensor:
        """Rows of x (rows, ...) go out in `in_splits`; returns the (sum(out_splits), ...) rows received."""
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        with collective(f"expert {op} all_to_all", self.group, self.name):
            with self.telemetry.span(self.name, op, "all_to_all", _or(nbytes, x), _size(x)):
                dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def all_to_all_equal(self, x: Tensor, op: str) -> Tensor:
        """all_to_all of x (size * n, ...) in equal slices: the counts exchanged before a payload."""
        out = torch.empty_like(x)
        with collective(f"expert {op} all_to_all", self.group, self.name):
            with self.telemetry.span(self.name, op, "all_to_all", _size(x), _size(x)):
                dist.all_to_all_single(out, x.contiguous(), group=self.group)
        return out

    def all_reduce(self, x: Tensor, op: str, nbytes: int | None = None, async_op: bool = False) -> Any:
        """Sum x in place over the group; with `async_op`, returns a handle whose `wait()` completes it."""
        call = self.telemetry.start(self.name, op, "all_reduce", _or(nbytes, x), _size(x))
        return self._finish(dist.all_reduce(x, group=self.group, async_op=async_op), call, async_op)

    def reduce_scatter(self, out: Tensor, x: Tensor, op: str, async_op: bool = False) -> Any:
        call = self.telemetry.start(self.name, op, "reduce_scatter", _size(x), _size(x))
        work = dist.reduce_scatter_tensor(out, x, group=self.group, async_op=async_op)
        return self._finish(work, call, async_op)

    def all_gather(
        self, out: Tensor, x: Tensor, op: str, nbytes: int | None = None, async_op: bool = False
    ) -> Any:
        call = self.telemetry.start(self.name, op, "all_gather", _or(nbytes, x), _size(x))
        work = dist.all_gather_into_tensor(out, x, group=self.group, async_op=async_op)
        return self._finish(work, call, async_op)

    def _finish(self, work: Any, call: _Call | None, async_op: bool) -> Any:
        if async_op:
            return _Pending(work, self.telemetry, call)
        self.telemetry.stop(call)
        return None


def _size(x: Tensor) -> int:
    return x.numel() * x.element_size()


def _or(nbytes: int | None, x: Tensor) -> int:
    return _size(x) if nbytes is None else nbytes
