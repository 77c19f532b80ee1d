"""The W&B recipe overlay (recipes/configs/wandb.yaml) on top of the debug config, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from callback_checks import offline_wandb, wandb_history, wandb_run_dir
from lightning.pytorch.loggers import WandbLogger
from recipe_checks import load_train

from lightning_dsv3.callbacks import MemoryProfiler, Throughput

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_debug_recipe_with_the_wandb_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = load_train().main
    monkeypatch.chdir(tmp_path)
    configs = RECIPES / "configs"
    args = [
        "fit", "--config", str(configs / "debug.yaml"), "--config", str(configs / "wandb.yaml"),
        "--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--data.seq_len=32", "--data.max_bytes=1048576", "--trainer.enable_progress_bar=false",
        # absolute: wandb's service process resolves paths against the folder it started in
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    with offline_wandb(tmp_path / "wandb-home"):
        cli = main(args)
        assert isinstance(cli.trainer.logger, WandbLogger)
        cli.trainer.logger.experiment.finish()
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert {MemoryProfiler, Throughput} <= kinds
    keys = {k for row in wandb_history(wandb_run_dir(tmp_path / "runs")) for k in row}
    assert {"train_loss", "memory/rank0/params_mib", "memory/plot/_type"} <= keys
