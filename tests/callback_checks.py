"""Runs the callback tests share: a short fit with every callback (one process, or on every rank of
the process pool under DSV3Strategy), and a reader for what W&B wrote in offline mode."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import DataLoader

from lightning_dsv3.callbacks import (
    CommunicationStats,
    ExpertLoadMonitor,
    MemoryProfiler,
    PipelineTimeline,
    Throughput,
)
from lightning_dsv3.module import DeepSeekV3Module

SEQ = 16
OVERRIDES = {"max_seq_len": SEQ, "original_seq_len": SEQ}
PEAK_FLOPS = 1e11  # a made-up CPU peak, so that MFU is logged


def callbacks(dirpath: Path, every_n_steps: int) -> dict[str, L.Callback]:
    return {
        "memory": MemoryProfiler(dirpath=dirpath / "memory"),
        "comm": CommunicationStats(every_n_steps=1),
        "timeline": PipelineTimeline(every_n_steps=every_n_steps, dirpath=dirpath / "timeline"),
        "experts": ExpertLoadMonitor(every_n_steps=every_n_steps, dirpath=dirpath / "experts"),
        "throughput": Throughput(peak_flops_per_device=PEAK_FLOPS, window_size=2),
    }


def fit(
    dirpath: Path,
    logger: Logger,
    steps: int,
    every_n_steps: int,
    strategy: Any = "auto",
    devices: int = 1,
    global_batch: int = 8,
    val_every: int | None = None,
    accelerator: str = "cpu",
    extra: dict[str, L.Callback] | None = None,
) -> tuple[dict[str, L.Callback], DeepSeekV3Module]:
    """Fit the debug preset on random tokens with every callback (or only those in `extra`); return the
    callbacks by name and the trained module."""
    cbs = callbacks(dirpath, every_n_steps) if extra is None else extra
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=steps, logger=logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(cbs.values()), num_sanity_val_steps=0,
        limit_val_batches=2 if val_every else 0, val_check_interval=val_every, use_distributed_sampler=False,
    )  # fmt: skip
    rows = list(
        torch.randint(0, 256, (steps * global_batch, SEQ + 1), generator=torch.Generator().manual_seed(0))
    )
    loader = DataLoader(rows, batch_size=global_batch)  # the same batches on every (pipeline) rank
    module = DeepSeekV3Module(preset="debug", model_overrides=OVERRIDES)
    trainer.fit(module, loader, loader if val_every else None)
    return cbs, module


@contextmanager
def offline_wandb(root: Path) -> Iterator[None]:
    """W&B in offline mode with every file it writes under `root`; the environment restored after."""
    env = {
        "WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data"), "WANDB_SILENT": "true",
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pipeline_run(dirpath: str) -> dict[str, Any]:
    """On every pool rank: DSV3Strategy pp=2 DualPipeV, two steps, W&B offline on rank 0."""
    import torch.distributed as dist

    from lightning_dsv3.strategy import DSV3Strategy

    root = Path(dirpath)
    with offline_wandb(root):
        logger = WandbLogger(project="callbacks", save_dir=str(root), offline=True)
        cbs, _ = fit(
            root, logger, steps=2, every_n_steps=2, strategy=DSV3Strategy(pp=2, schedule="dualpipev"),
            devices=dist.get_world_size(),
        )  # fmt: skip
        if dist.get_rank() == 0:
            logger.experiment.finish()
    timeline, experts, memory = cbs["timeline"], cbs["experts"], cbs["memory"]
    return {
        "timeline": str(timeline.last_path) if timeline.last_path else None,
        "layers": list(experts.last),
        "memory": memory.samples,
        "measured": memory.measured,
        "recommendations": memory.recommendations,
    }


def expert_parallel_run(dirpath: str) -> dict[str, Any]:
    """On every pool rank: DSV3Strategy ep=2 (two data slices), the communication, expert-load and
    throughput callbacks, a CSV log; rank 0 returns what it logged."""
    import torch.distributed as dist

    from lightning_dsv3.strategy import DSV3Strategy

    root = Path(dirpath)
    logger = CSVLogger(root)
    cbs = {
        "comm": CommunicationStats(every_n_steps=1, all_ranks=True),
        "experts": ExpertLoadMonitor(every_n_steps=2, dirpath=root / "experts"),
        "throughput": Throughput(peak_flops_per_device=PEAK_FLOPS, window_size=2),
    }
    strategy = DSV3Strategy(ep=2)
    fit(root, logger, steps=2, every_n_steps=2, strategy=strategy, devices=dist.get_world_size(), extra=cbs)
    if dist.get_rank() != 0:
        return {}
    return {"rows": csv_metrics(logger), "experts": cbs["experts"].last}


class _LocalLoads(L.Callback):
    """This rank's own counts per layer before each optimizer step (listed before the monitor, so both
    read before the module consumes them)."""

    def __init__(self) -> None:
        self.loads: list[dict[str, list[float]]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        routers = {name: r for chunk in pl_module.chunks() for name, r in chunk.routers()}
        self.loads.append({n.removesuffix(".ffn.router"): r.expert_load.tolist() for n, r in routers.items()})


def ddp_expert_load_run(dirpath: str) -> dict[str, Any]:
    """On every pool rank: Lightning's DDP, each rank its own half of the batches (DistributedSampler),
    the expert-load monitor every step; this rank's own counts, what the monitor holds and logged."""
    import torch.distributed as dist

    root = Path(dirpath)
    logger = CSVLogger(root)
    spy, monitor = _LocalLoads(), ExpertLoadMonitor(every_n_steps=1, dirpath=root / "experts")
    trainer = L.Trainer(
        accelerator="cpu", devices=dist.get_world_size(), strategy="ddp", max_steps=2, logger=logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[spy, monitor], limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    rows = list(torch.randint(0, 256, (16, SEQ + 1), generator=torch.Generator().manual_seed(0)))
    module = DeepSeekV3Module(preset="debug", model_overrides=OVERRIDES)
    trainer.fit(module, DataLoader(rows, batch_size=4))
    return {
        "biases": {name: r.e_score_correction_bias.tolist() for name, r in module.model.routers()},
        "local": spy.loads[-1],
        "last": monitor.last,
        "rows": csv_metrics(logger) if dist.get_rank() == 0 else [],
    }


class _CountAllReduce(L.Callback):
    """torch.distributed.all_reduce calls per training batch, the monitor's end-of-batch work included
    (listed after it)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.calls = 0
        self._start = 0

    def counted(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return fn(*args, **kwargs)

        return call

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = self.calls

    def on_train_batch_end(self, *args: Any) -> None:
        self.per_step.append(self.calls - self._start)


def dsv3_all_reduce_count_run(dirpath: str, layout: dict[str, Any]) -> dict[str, Any]:
    """On every pool rank: two fits of three steps under DSV3Strategy(**layout), with the expert-load
    monitor every step and without it; all_reduce calls per step of each, and the monitor's loads."""
    import torch.distributed as dist

    from lightning_dsv3.strategy import DSV3Strategy

    root, real = Path(dirpath), dist.all_reduce
    out: dict[str, Any] = {}
    for name in ("with", "without"):
        counter = _CountAllReduce()
        monitor = (
            {"experts": ExpertLoadMonitor(every_n_steps=1, dirpath=root / name)} if name == "with" else {}
        )

        dist.all_reduce = counter.counted(real)
        try:
            strategy = DSV3Strategy(**layout)
            fit(
                root / name, CSVLogger(root / name), steps=3, every_n_steps=1, strategy=strategy,
                devices=dist.get_world_size(), extra={**monitor, "count": counter},
            )  # fmt: skip
        finally:
            dist.all_reduce = real
        out[name] = counter.per_step
        if monitor:
            out["last"] = monitor["experts"].last
    return out


# ---- reading an offline W&B run --------------------------------------------------------------------
def wandb_run_dir(root: Path) -> Path:
    (run,) = (root / "wandb").glob("offline-run-*")
    return run


def wandb_history(run_dir: Path, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The history rows of an offline run, read from its run-*.wandb transaction log.

    That file is a LevelDB-style log (the format wandb's own writer uses): a 7-byte header, then 32 KiB
    blocks of records, each a 7-byte header (checksum, length, type: full, first, middle, last) and a
    piece of a protobuf `Record`. Nested keys ("img/_type") are joined with "/". wandb's service process
    writes the log behind `finish()`, so this waits (up to `timeout_s`) for the run's exit record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows, complete = _read_history(run_dir)
        if complete:
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_dir} has no exit record after {timeout_s} s: the run did not finish")
        time.sleep(0.2)


def _read_history(run_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """(history rows, whether the exit record was reached) of what the log holds now."""
    from wandb.proto import wandb_internal_pb2

    paths = list(run_dir.glob("run-*.wandb"))
    if not paths:
        return [], False
    raw = paths[0].read_bytes()
    if raw[:4] != b":W&B":
        return [], False
    block, pos, pieces, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(raw):
            break  # not written yet
        pieces += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            kind_name = record.WhichOneof("record_type")
            if kind_name == "exit":
                return rows, True
            if kind_name == "history":
                items = record.history.item
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
    return rows, False


def wandb_image_keys(run_dir: Path) -> set[str]:
    """Keys of the images the run holds: W&B writes each to files/media/images/<key>_<step>_<hash>.png."""
    media = run_dir / "files" / "media" / "images"
    return {p.relative_to(media).as_posix().rsplit("_", 2)[0] for p in media.rglob("*.png")}


def csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    import csv

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))
