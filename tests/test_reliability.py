"""Resuming without loss in one process: the data position, auto-resume, atomic saves, retention, seeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from fault_checks import own_process_group
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsv3.data import DSV3DataModule, ResumableLoader, ResumableSampler, TokenWindows
from lightning_dsv3.module import DeepSeekV3Module
from lightning_dsv3.strategy import DSV3Strategy

SEQ = 16
STEPS = 6


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left() -> Iterator[None]:
    with own_process_group():
        yield


# ---- the data position ----------------------------------------------------------------------------
def _loaders(replicas: int, batch_size: int, windows: int = 101, seed: int = 3) -> list[ResumableLoader]:
    dataset = TokenWindows(torch.arange(windows * (SEQ + 1)) % 256, SEQ)
    return [
        ResumableLoader(dataset, batch_size, ResumableSampler(dataset, replicas, rank, seed), num_workers=0)
        for rank in range(replicas)
    ]


def _global_batches(loaders: list[ResumableLoader], n: int | None = None) -> list[set[int]]:
    """The window ids (first token // 17) of each global batch, over every rank's loader."""
    per_rank = [[batch[:, 0].div(SEQ + 1, rounding_mode="floor") for batch in loader] for loader in loaders]
    steps = min(len(b) for b in per_rank) if n is None else n
    return [{int(i) for rank in per_rank for i in rank[k]} for k in range(steps)]


def _consume(loaders: list[ResumableLoader], n: int) -> list[dict[str, int]]:
    for loader in loaders:
        iterator = iter(loader)
        for _ in range(n):
            next(iterator)
    return [loader.state_dict() for loader in loaders]


def test_a_loader_resumes_mid_epoch_with_the_batches_an_unbroken_epoch_reads() -> None:
    whole = _global_batches(_loaders(2, 4))
    states = _consume(_loaders(2, 4), 3)
    assert states[0] == states[1] == {"epoch": 0, "consumed": 24, "windows": 101, "seed": 3}
    resumed = _loaders(2, 4)
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
        assert len(loader) == len(whole) - 3  # Lightning sees where the resumed epoch ends
    assert _global_batches(resumed) == whole[3:]
    assert len(resumed[0]) == len(whole)  # the next epoch is whole again


@pytest.mark.parametrize(("replicas", "batch_size"), [(4, 2), (1, 8)])
def test_the_position_carries_to_another_mesh_with_the_same_global_batch(
    replicas: int, batch_size: int
) -> None:
    whole = _global_batches(_loaders(2, 4))
    (state, _) = _consume(_loaders(2, 4), 5)
    resumed = _loaders(replicas, batch_size)
    for loader in resumed:
        loader.load_state_dict(state)
    assert _global_batches(resumed) == whole[5 : len(_global_batches(resumed)) + 5]


def test_a_position_saved_at_the_end_of_an_epoch_starts_the_next() -> None:
    (loader,) = _loaders(1, 10)
    state = _consume([loader], len(loader))[0]
    (fresh,) = _loaders(1, 10)
    fresh.load_state_dict(state)
    assert fresh.sampler.epoch == 1 and len(fresh) == len(loader)
    epoch1 = [b for b in fresh]
    (other,) = _loaders(1, 10)
    other.sampler.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, other))


def test_a_position_for_other_data_warns() -> None:
    (loader,) = _loaders(1, 4)
    with pytest.warns(UserWarning, match="101 windows shuffled with seed 3, this data has 90 with seed 3"):
        _loaders(1, 4, windows=90)[0].load_state_dict(loader.state_dict() | {"windows": 101})


# ---- a Trainer in one process with DSV3Strategy ----------------------------------------------------
class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit(ckpt_dir: Path, steps: int, ckpt_path: str | None = None) -> dict[int, float]:
    """{global step: loss} of the debug model over the stdlib corpus, a checkpoint every 2 steps."""
    L.seed_everything(0)
    losses = _Losses()
    keep_two = ModelCheckpoint(
        dirpath=ckpt_dir, every_n_train_steps=2, save_last=True, monitor="step", mode="max", save_top_k=2
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=DSV3Strategy(), max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[losses, keep_two],
    )  # fmt: skip
    module = DeepSeekV3Module(model_overrides={"max_seq_len": SEQ, "original_seq_len": SEQ, "n_layers": 2})
    trainer.fit(module, DSV3DataModule(seq_len=SEQ, batch_size=4, max_bytes=2**16), ckpt_path=ckpt_path)
    return losses.losses


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[int, float]:
    runs = [_fit(tmp_path_factory.mktemp("unbroken"), STEPS) for _ in range(2)]
    assert runs[0] == runs[1]  # determinism: same config and seed, same losses
    return runs[0]


def _interrupted(tmp_path: Path) -> Path:
    """A run stopped after 5 steps (mid-epoch): checkpoints at steps 2 and 4 and last.ckpt (step 4)."""
    ckpt_dir = tmp_path / "ckpt"
    _fit(ckpt_dir, 5)
    return ckpt_dir


def test_same_seed_same_losses(unbroken) -> None:
    assert sorted(unbroken) == list(range(1, STEPS + 1))


def test_resume_from_last_continues_mid_epoch_like_an_unbroken_run(tmp_path, unbroken) -> None:
    ckpt_dir = _interrupted(tmp_path)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    for name, file in [("epoch=0-step=8.ckpt.tmp", "__0_0.distcp"), ("last.ckpt.old", "meta.pt")]:
        (ckpt_dir / name).mkdir()  # what saves killed mid-way leave
        (ckpt_dir / name / file).write_bytes(b"partial")
    (ckpt_dir / "notes.tmp").mkdir()  # not a save's: kept
    (ckpt_dir / "notes.tmp" / "todo.txt").write_text("keep me")
    resumed = _fit(ckpt_dir, STEPS, ckpt_path="last")
    assert resumed == {step: unbroken[step] for step in (5, 6)}
    # keep-last-2 retention removed the step-2 folder, the next save swept the partial ones
    expected = ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt", "notes.tmp"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == expected


def test_auto_resume_falls_back_from_a_corrupt_last_to_the_newest_good(tmp_path, unbroken) -> None:
    ckpt_dir = _interrupted(tmp_path)
    shard = next((ckpt_dir / "last.ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(
        UserWarning, match=r"last\.ckpt/__0_0\.distcp is truncated.*newest good checkpoint.*step=4"
    ):
        resumed = _fit(ckpt_dir, STEPS, ckpt_path="last")
    assert resumed == {step: unbroken[step] for step in (5, 6)}
