"""A pool of CPU processes joined by gloo, started once and reused by many checks.

Spawning and joining a process group costs seconds, so each pool starts `world_size` workers once
per test session; every check is a picklable function run on all ranks, and its per-rank return
values (or the first rank's traceback) come back to the test.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

_TIMEOUT_S = 300
_GRACE_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", GROUP_RANK="0", OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report, keep serving: one failing check must not stall the pool
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ProcessPool:
    """`world_size` gloo ranks that run `pool.run(fn, *args)` together."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.broken = False  # a check left ranks stuck: the pool cannot run more checks
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run fn(*args) on every rank; returns the results in rank order or raises the first error."""
        if self.broken:
            raise RuntimeError("an earlier check left this pool's ranks stuck; see that failure")
        for q in self.tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors: list[str] = []
        for _ in range(self.world_size):
            try:  # once a rank failed, its peers may wait forever on it: report after a short grace
                rank, ok, value = self.results.get(timeout=_GRACE_S if errors else _TIMEOUT_S)
            except queue.Empty:
                self.broken = True
                raise AssertionError("\n".join(sorted(errors)) or f"no answer in {_TIMEOUT_S} s") from None
            (out.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        if errors:
            raise AssertionError("\n".join(sorted(errors)))
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5 if self.broken else 30)
            if p.is_alive():
                p.kill()
