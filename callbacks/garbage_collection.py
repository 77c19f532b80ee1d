"""Python's garbage collector run at the same step on every rank, between steps.

The cyclic collector starts whenever allocations of container objects outrun deallocations by a
threshold. A training step makes many short-lived ones (autograd nodes, tensor wrappers, the pipeline
runtime's tapes and events), so collections come every few steps, in the middle of a step and at a
different moment on each rank. Where the host bounds the step (small micro-batches, many kernels) the
device waits for each pause; under a pipeline, one rank's pause also stalls the ranks that wait for
its sends. `GarbageCollection` turns automatic collection off for the fit and collects after every
`every_n_steps`-th optimizer step on every rank (Megatron-LM and torchtitan offer the same switch).
With the default full collection, garbage cycles live at most that many steps.

A full collection walks every tracked object: with torch, Lightning and the mini preset's module
loaded that is some 457K objects and 238 ms on a CPU host, each time. So when the fit starts, after
one full collection, everything alive is frozen (`gc.freeze`: moved out of the collector's sight;
nearly all of it lives for the whole fit anyway, and a cycle among it that dies during the fit waits
for the fit's end), and later collections walk only what the fit made since: 0.8 ms for
the same full collection (`benchmarks/gc_pause.py`; its result file is quoted in README).

Two collections it does not move: torch.compile collects after compiling a graph (dynamo's
`run_gc_after_compile`; compilation happens in the first steps, or on a recompile), and DataLoader
workers forked during the fit get automatic collection back (a fork hook), since this callback
collects in the training process only.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

_ACTIVE: set[int] = set()  # ids of the callbacks that turned automatic collection off in this process


def _enable_in_forked_child() -> None:
    if _ACTIVE:
        _ACTIVE.clear()
        gc.enable()


os.register_at_fork(after_in_child=_enable_in_forked_child)


class GarbageCollection(Callback):
    """Collect garbage every `every_n_steps` optimizer steps instead of whenever Python decides.

    Args:
        every_n_steps: optimizer steps between collections (the same on every rank).
        generation: the oldest generation collected then: 2 (the default) is a full collection; 1 is
            faster, but whatever survived a collection (a step's outputs, logged values) moves to the
            oldest generation and its cycles then wait for the end of the fit.
    """

    def __init__(self, every_n_steps: int = 50, generation: int = 2) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if generation not in (0, 1, 2):
            raise ValueError(f"generation must be 0, 1 or 2 (the collector's generations), got {generation}")
        self.every_n_steps = every_n_steps
        self.generation = generation
        self._was_enabled: bool | None = None  # gc's state before the fit, restored after it
        self._froze = False  # whether this fit froze the objects alive at its start (unfrozen after)
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._was_enabled = gc.isenabled()
        gc.collect()
        # objects frozen before the fit belong to whoever froze them: unfreeze only what this froze
        self._froze = gc.get_freeze_count() == 0
        gc.freeze()
        gc.disable()
        _ACTIVE.add(id(self))
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # moves once per optimizer step, whatever the gradient accumulation
        if step != self._last_step and step % self.every_n_steps == 0:
            gc.collect(self.generation)
        self._last_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        _ACTIVE.discard(id(self))
        if self._froze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled, self._froze = None, False
