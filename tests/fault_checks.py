"""Workers of the reliability tests: runs in the process pools, a spawned pair, and under torchrun.

Importable by name (tests/ is on sys.path for pytest and its pools; torchrun workers get it through
PYTHONPATH), so the recipe can name `fault_checks.KillOnce` as a callback.
"""

from __future__ import annotations

import csv
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from checks import Capture, _Module, _state, batches
from recipe_checks import load_train
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dsv3.strategy import DSV3Strategy


@contextmanager
def own_process_group() -> Iterator[None]:
    """Leave no process group and no exported MASTER_PORT behind after DSV3Strategy ran in this process.

    In one process the strategy still creates a gloo group, whose store keeps listening on the port
    Lightning exported; a later test that launches a script would inherit that port and fail on it.
    """
    import torch.distributed as dist

    had_group, saved = dist.is_initialized(), dict(os.environ)
    try:
        yield
    finally:
        if not had_group and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


class KillOnce(L.Callback):
    """SIGKILLs rank `rank` after optimizer step `step`, on torchrun's first attempt only."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if first_attempt and trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def read_losses(metrics_csv: Path) -> dict[int, float]:
    """{step: train_loss} of a CSVLogger metrics file."""
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")}


def recipe_losses(args: list[str], log_dir: str) -> dict[int, float] | None:
    """Run recipes/train.py's CLI with `args` on this rank; rank 0 returns the logged per-step losses."""
    saved = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        cli = load_train().main(args)
    finally:  # seed_everything exports these; later checks of this pool must not inherit them
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    if cli.trainer.global_rank != 0:
        return None
    return read_losses(Path(log_dir) / "metrics.csv")


# ---- non-finite steps -----------------------------------------------------------------------------
class _Poisoned(_Module):
    """Makes rank 0's loss (a NaN head output) or one parameter's gradient non-finite at chosen steps."""

    def __init__(self, steps: tuple[int, ...], what: str, optim: str = "sgd") -> None:
        super().__init__(optim)
        self.poison_steps, self.what = steps, what
        self._hook: Any = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step not in self.poison_steps or self.trainer.global_rank != 0:
            return
        chunk = self.chunks()[0]
        if self.what == "loss":
            self._hook = chunk.head.register_forward_hook(lambda m, i, out: out * float("nan"))
        else:
            param = dict(chunk.named_parameters())[self.what]
            self._hook = param.register_hook(lambda g: g * float("inf"))

    def on_train_batch_end(self, *args: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class _States(L.Callback):
    """The module's state (whole-model names) and router biases after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.states.append(_state(module))


def _fit(
    strategy: DSV3Strategy, module: L.LightningModule, steps: int, callbacks: list[L.Callback]
) -> L.Trainer:
    """`steps` steps on this pool rank, step k reading rows [8k, 8k + 8) of `batches` as one global batch."""
    import torch.distributed as dist

    world = dist.get_world_size()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    data_size = world // strategy.parallel_config.pp
    rows = list(batches(steps, 8))
    sampler = DistributedSampler(
        rows, num_replicas=data_size, rank=dist.get_rank() % data_size, shuffle=False
    )
    trainer.fit(module, DataLoader(rows, batch_size=8 // data_size, sampler=sampler))
    return trainer


def nonfinite_run(
    layout: dict[str, Any],
    poison_steps: tuple[int, ...],
    what: str,
    steps: int,
    policy: dict[str, Any],
    optim: str = "sgd",
) -> dict[str, Any]:
    """Train `steps` steps with a poisoned module under DSV3Strategy(**layout, **policy); returns the
    losses, the state after each step and the skip counters."""
    strategy = DSV3Strategy(**layout, **policy)
    capture, states = Capture(), _States()
    trainer = _fit(strategy, _Poisoned(poison_steps, what, optim), steps, [capture, states])
    return {
        "losses": capture.losses,
        "states": states.states,
        "skipped": strategy.nonfinite.skipped,
        "logged_skipped": float(trainer.logged_metrics["nonfinite/skipped_steps"]),
    }


# ---- collective timeouts -------------------------------------------------------------------------
def mesh_group_timeouts(layout: dict[str, Any], seconds: float) -> dict[str, float]:
    """After one step under DSV3Strategy(timeout=seconds), the timeout of each mesh group of this
    rank that is not the default group (that one keeps init_process_group's)."""
    from torch.distributed.distributed_c10d import _get_default_group

    strategy = DSV3Strategy(**layout, timeout=timedelta(seconds=seconds))
    _fit(strategy, _Module("sgd"), 1, [])
    groups = {name: strategy.mesh.group(name) for name in ("pp", "dp", "ep", "dp_ep")}
    return {
        name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        for name, group in groups.items()
        if group is not _get_default_group()
    }


class _StallRank1(L.Callback):
    """Rank 1 stops before the forward of step 1 until the test lets it go: rank 0 waits in a collective."""

    def __init__(self, release: Any) -> None:
        self.release = release

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 1 and trainer.global_rank == 1:
            self.release.wait(120)


def stuck_collective_worker(
    rank: int, port: int, timeout_s: float, results: Any, start: Any, release: Any
) -> None:
    """One of two spawned ranks: a Trainer whose DSV3Strategy(ep=2) sets a short collective timeout.

    Puts (rank, error message or None) on `results`.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    strategy = DSV3Strategy(ep=2, timeout=timedelta(seconds=timeout_s))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[_StallRank1(release)],
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    rows = list(batches(3, 8))
    loader = DataLoader(rows, batch_size=4, sampler=DistributedSampler(rows, 2, rank, shuffle=False))
    start.wait(60)  # both ranks enter the process group together, well within the short timeout
    try:
        trainer.fit(_Module("sgd"), loader)
        results.put((rank, None))
    except Exception as err:  # the expected outcome on rank 0
        results.put((rank, f"{type(err).__name__}: {err}"))
    if rank == 0:
        release.set()
    time.sleep(0.5)
