"""GarbageCollection: automatic collection off for the fit, a collection every n optimizer steps, and
the collector's state given back however the fit ends."""

from __future__ import annotations

import gc
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dsv3.callbacks import GarbageCollection


@pytest.fixture(autouse=True)
def _collector_restored() -> Any:
    """A failing test must not leave automatic collection off for the rest of the session."""
    was, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    if not frozen:
        gc.unfreeze()
    if was:
        gc.enable()


class _Probe(pl.Callback):
    """Whether automatic collection was on at each batch, and how many objects were frozen."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []
        self.frozen: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.enabled.append(gc.isenabled())
        self.frozen.append(gc.get_freeze_count())


def _fit(callbacks: list[pl.Callback], model: pl.LightningModule | None = None, **trainer: Any) -> None:
    options = dict(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    pl.Trainer(callbacks=callbacks, **{**options, **trainer}).fit(model or BoringModel())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_collects_every_n_optimizer_steps_with_automatic_collection_off(
    monkeypatch: pytest.MonkeyPatch, accumulate: int
) -> None:
    collected: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation) or real(generation))
    probe = _Probe()
    assert gc.isenabled()
    _fit([GarbageCollection(every_n_steps=2, generation=1), probe], accumulate_grad_batches=accumulate)
    assert probe.enabled == [False] * 6 * accumulate
    assert collected == [2, 1, 1, 1]  # a full collection at the start, then after steps 2, 4 and 6
    assert min(probe.frozen) > 0  # what was alive at the start is out of the collector's sight
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_child_forked_during_the_fit_collects_on_its_own() -> None:
    """DataLoader workers forked mid-fit would inherit the disabled collector; a fork hook turns it on."""
    import multiprocessing

    class ForkProbe(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 1:
                ctx = multiprocessing.get_context("fork")
                queue = ctx.SimpleQueue()
                child = ctx.Process(target=lambda: queue.put(gc.isenabled()))
                child.start()
                self.child_enabled = queue.get()
                child.join()

    probe = ForkProbe()
    _fit([GarbageCollection(), probe], max_steps=2)
    assert probe.child_enabled


def test_the_collector_is_turned_back_on_when_the_fit_fails() -> None:
    class Failing(BoringModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        _fit([GarbageCollection(every_n_steps=1)], Failing())
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off_and_frozen_objects_stay_frozen() -> None:
    gc.disable()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        _fit([GarbageCollection()])
        assert not gc.isenabled() and gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"generation": 3}])
def test_bad_settings_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="every_n_steps|generation"):
        GarbageCollection(**kwargs)
