"""Throughput: tokens/s, FLOP/s and MFU of DeepSeek-V3 training through Lightning's ThroughputMonitor.

Lightning's `ThroughputMonitor` does the timing and the logging; this subclass supplies what it needs
for a DeepSeekV3Module: the batch size and token count of a (batch, seq + 1) batch, and the module's
`flops_per_batch` from `lightning_dsv3.flops` (matrix-multiply FLOPs of MLA and of the activated
experts only; a training batch is 3 x the forward, a validation or test batch 1 x), set before each batch.
A module that is not a DeepSeek-V3 one keeps its own `flops_per_batch`, as ThroughputMonitor expects.

Keys (Lightning's names, `train/` or `validate/` first): `device/items_per_sec` is tokens/s,
`device/flops_per_sec` FLOP/s (divide by 1e12 for TFLOP/s), `device/mfu` the model FLOPs
utilisation; without `device/` the same summed over data-parallel replicas. Under DSV3Strategy a
"device" is one pipeline (pp ranks reading the same data slice): its peak is pp x a GPU's and the
replicas are the dp x ep data slices, so MFU is per GPU all the same. `peak_flops_per_device` sets the
peak where Lightning's table has none (CPUs, unlisted GPUs).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.flops import forward_flops, train_flops


def sequences(batch: torch.Tensor) -> int:
    """Sequences in a (batch, seq + 1) token batch."""
    return int(batch.shape[0])


def tokens(batch: torch.Tensor) -> int:
    """Predicted tokens in a (batch, seq + 1) token batch: batch x seq."""
    return int(batch.shape[0] * (batch.shape[1] - 1))


class Throughput(ThroughputMonitor):
    """ThroughputMonitor with the DeepSeek-V3 FLOP model and DSV3Strategy's replicas.

    Args:
        peak_flops_per_device: peak FLOP/s of one device for MFU (default: Lightning's table for the
            GPU and precision; none on CPU, so no MFU there unless given).
        causal: count half the attention scores (what a causal kernel computes); see flops.py.
        window_size: batches the rates are averaged over (none are logged before the window fills).
    """

    def __init__(
        self, peak_flops_per_device: float | None = None, causal: bool = True, window_size: int = 100
    ) -> None:
        super().__init__(batch_size_fn=sequences, length_fn=tokens, window_size=window_size)
        self.peak_flops_per_device = peak_flops_per_device
        self.causal = causal

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        mesh = getattr(trainer.strategy, "mesh", None)
        pp, replicas = (mesh.pp, mesh.data_size) if mesh is not None else (1, trainer.world_size)
        peak = self.peak_flops_per_device or self.available_flops
        self.available_flops = peak * pp if peak else None
        for throughput in self._throughputs.values():  # ThroughputMonitor sized them by the world
            throughput.world_size = replicas
            throughput.available_flops = self.available_flops

    def _set_flops(self, pl_module: pl.LightningModule, batch: Any, training: bool) -> None:
        config = getattr(pl_module, "config", None)
        if not isinstance(config, ModelConfig) or not torch.is_tensor(batch):
            return
        count = train_flops if training else forward_flops
        pl_module.flops_per_batch = int(count(config, batch.shape[0], batch.shape[1] - 1, self.causal))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_flops(pl_module, batch, training=True)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._set_flops(pl_module, batch, training=False)

    on_test_batch_start = on_validation_batch_start  # a test batch is a forward, as a validation one
