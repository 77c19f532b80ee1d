"""Run a recipe through its CLI inside the test process pool (see harness.py), shrunk to CPU size."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.distributed as dist

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# A GPU recipe on CPU processes: the debug model on short sequences for two steps, everything else
# (strategy, layout, micro-batches, precision, callbacks, logger) as the YAML says.
CPU_OVERRIDES = (
    "--trainer.accelerator=cpu", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--model.preset=debug", "--model.model_overrides=null",
    "--data.seq_len=32", "--data.max_bytes=1048576", "--model.compile=false",
)  # fmt: skip


def load_train() -> ModuleType:
    """recipes/train.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location("recipes_train", RECIPES / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(config: str, out_dir: str, *extra: str) -> dict[str, Any]:
    """`fit` a recipe with CPU_OVERRIDES on this rank; returns what it trained and how.

    A process group the run started (one process, outside the pool) is destroyed afterwards and the
    variables Lightning set to start it are removed, so the test process is left as it was found.
    """
    had_group = dist.is_initialized()
    environ = dict(os.environ)
    try:
        cli = load_train().main(
            [
                "fit", "--config", str(RECIPES / "configs" / config), *CPU_OVERRIDES,
                f"--trainer.default_root_dir={out_dir}", f"--trainer.logger.init_args.save_dir={out_dir}",
                *extra,
            ]
        )  # fmt: skip
    finally:
        if not had_group:
            if dist.is_initialized():
                dist.destroy_process_group()
            os.environ.clear()
            os.environ.update(environ)
    trainer = cli.trainer
    return {
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "train_loss": float(trainer.callback_metrics["train_loss"]),
        "precision": trainer.precision,
        "log_dir": trainer.logger.log_dir,
    }
