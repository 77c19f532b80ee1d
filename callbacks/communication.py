"""CommunicationStats: the strategy's communication telemetry, logged every N steps.

The numbers come from `trainer.strategy.communication_stats()`, a flat dict of metric names (for
example `comm/ep.dispatch/bytes`, `.../bytes_sent`, `.../time_ms`, `.../gbps`, `.../peak_gbps`,
`.../compression_ratio`): bytes before and after compression, achieved against measured bandwidth,
per process group. The strategy owns what is measured (DSV3Strategy: this rank's traffic in the last
optimizer step); this callback decides when to ask and where the numbers go: rank 0's as they are,
or with `all_ranks` every rank's, gathered, as `<name>/rank{r}` (pipeline stages and expert shards
move different bytes). Strategies without telemetry (Lightning's own) are skipped with one warning.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dsv3.callbacks.report import gather, log_scalars


class CommunicationStats(pl.Callback):
    """Log `trainer.strategy.communication_stats()` after every `every_n_steps`-th optimizer step.

    Every rank calls the method (it may be collective); the loggers write on rank 0.

    Args:
        every_n_steps: log after every n-th optimizer step.
        all_ranks: gather every rank's numbers (one gather per logged step) instead of rank 0's.
    """

    def __init__(self, every_n_steps: int = 10, all_ranks: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.all_ranks = all_ranks
        self._warned = False
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return  # no optimizer step yet, still accumulating, or not a logging step
        self._last_step = step
        stats = getattr(trainer.strategy, "communication_stats", None)
        if stats is None:
            if not self._warned:
                rank_zero_warn(
                    f"CommunicationStats: {type(trainer.strategy).__name__} has no communication_stats(); "
                    "nothing to log (DSV3Strategy provides it)"
                )
                self._warned = True
            return
        local = {k: float(v) for k, v in stats().items()}
        if not self.all_ranks:
            log_scalars(trainer, local, step)
            return
        ranks = gather(local)
        log_scalars(
            trainer, {f"{k}/rank{r}": v for r, values in enumerate(ranks) for k, v in values.items()}, step
        )
