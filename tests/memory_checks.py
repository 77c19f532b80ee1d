"""Worker functions the process pools run for the checkpointing, accumulation and memory-model tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import checks
import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dsv3.config import get_preset
from lightning_dsv3.model import Transformer
from lightning_dsv3.module import DeepSeekV3Module, decay_groups
from lightning_dsv3.strategy import DSV3Strategy


@contextmanager
def model_overrides(**changes: Any) -> Iterator[None]:
    """Run checks' reference and strategy runs on a changed model config (checks.OVERRIDES is read
    when their model is built), restoring it afterwards."""
    saved = dict(checks.OVERRIDES)
    checks.OVERRIDES.update(changes)
    try:
        yield
    finally:
        checks.OVERRIDES.clear()
        checks.OVERRIDES.update(saved)


def strategy_run_with(changes: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    """checks.strategy_run (SGD, STEPS steps of GLOBAL_BATCH) on a model config with `changes`."""
    with model_overrides(**changes):
        return checks.strategy_run(layout, checks.STEPS, checks.GLOBAL_BATCH, "sgd")


# ---- gradient accumulation ---------------------------------------------------------------------
ACC_SEQ = 8
ACC_OVERRIDES = {"max_seq_len": ACC_SEQ, "original_seq_len": ACC_SEQ, "aux_loss_alpha": 0.01}
ACC_OPTIM = {"lr": 0.05}


def accumulation_rows(steps: int, global_batch: int) -> torch.Tensor:
    """(steps * global_batch, ACC_SEQ + 1) token ids; optimizer step k uses rows [k B, (k + 1) B)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (steps * global_batch, ACC_SEQ + 1), generator=gen)


class _SGDModule(DeepSeekV3Module):
    def __init__(self) -> None:
        super().__init__(preset="debug", model_overrides=ACC_OVERRIDES)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(decay_groups(self.named_parameters(), 0.0), **ACC_OPTIM)


class _GradsPerStep(L.Callback):
    """The reduced gradients of every optimizer step (full tensors: run without ZeRO-1)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self.grads.append({n.removeprefix("model."): p.grad.clone() for n, p in module.named_parameters()})


def accumulation_run(steps: int, batch_per_rank: int, n_microbatches: int, accumulate: int) -> list[dict]:
    """Train `steps` optimizer steps with dp = world size, each rank reading `batch_per_rank` sequences
    per Lightning batch split into `n_microbatches`, and `accumulate` batches per optimizer step."""
    import torch.distributed as dist

    world = dist.get_world_size()
    capture = _GradsPerStep()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=DSV3Strategy(zero=False, n_microbatches=n_microbatches),
        max_steps=steps, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[capture], limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    rows = list(accumulation_rows(steps, batch_per_rank * world * accumulate))
    sampler = DistributedSampler(rows, num_replicas=world, rank=dist.get_rank(), shuffle=False)
    trainer.fit(_SGDModule(), DataLoader(rows, batch_size=batch_per_rank, sampler=sampler))
    return capture.grads


def accumulation_reference(steps: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
    """One process, each optimizer step's whole batch at once: the gradients of every step."""
    model = Transformer(get_preset("debug", **ACC_OVERRIDES))
    model.init_weights(0)
    opt = torch.optim.SGD(model.parameters(), **ACC_OPTIM)
    rows = accumulation_rows(steps, global_batch)
    grads = []
    for k in range(steps):
        model.training_loss(rows[k * global_batch : (k + 1) * global_batch]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for _, router in model.routers():
            router.update_bias()
        opt.step()
        opt.zero_grad()
    return grads


# ---- what the strategy allocates ---------------------------------------------------------------
class _AdamWModule(DeepSeekV3Module):
    def __init__(self) -> None:
        super().__init__(preset="debug", model_overrides=checks.OVERRIDES)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(self.named_parameters(), 0.1), lr=1e-4)


class _Allocations(L.Callback):
    """Bytes of the tensors the strategy holds: parameters, their gradients before the reduction, ZeRO-1's
    masters and their gradients before the step, AdamW's moments after it."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    @staticmethod
    def _sum(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        reducer = trainer.strategy.reducer
        launch = reducer._launch

        def measure_then_launch(bucket: Any) -> Any:
            # a bucket's full gradients exist until its reduction starts (during the last backward, or
            # in reduce_gradients) and, under ZeRO-1, frees them: their sum over buckets is the total
            self.bytes["grads"] = self.bytes.get("grads", 0) + self._sum(p.grad for p in bucket.params)
            return launch(bucket)

        reducer._launch = measure_then_launch

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        buckets = [b for b in trainer.strategy.reducer.buckets if b.master is not None]
        # a master that is a slice of the parameters' own buffer (fp32 parameters) adds no bytes
        self.bytes["masters"] = self._sum(b.master for b in buckets if b.storage is None)
        self.bytes["master_grads"] = self._sum(b.master.grad for b in buckets)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.bytes["params"] = self._sum(module.parameters())
        states = trainer.optimizers[0].state.values()
        self.bytes["moments"] = self._sum(
            t for s in states for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
        )


def allocation_run(layout: dict[str, Any]) -> dict[str, Any]:
    """One AdamW step through Trainer + DSV3Strategy on this rank: the bytes it allocated, and where."""
    import torch.distributed as dist

    world = dist.get_world_size()
    capture = _Allocations()
    strategy = DSV3Strategy(**layout)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[capture], limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    rows = list(checks.batches(1, checks.GLOBAL_BATCH))
    data_size = world // layout.get("pp", 1)
    sampler = DistributedSampler(
        rows, num_replicas=data_size, rank=dist.get_rank() % data_size, shuffle=False
    )
    trainer.fit(
        _AdamWModule(), DataLoader(rows, batch_size=checks.GLOBAL_BATCH // data_size, sampler=sampler)
    )
    return {"pp_rank": strategy.mesh.pp_rank, **capture.bytes}
