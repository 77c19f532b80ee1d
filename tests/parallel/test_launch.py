"""The way users launch: torchrun starts the processes, the recipe trains and resumes through the strategy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or ""
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "recipes" / "train.py"), "fit",
        "--config", str(ROOT / "recipes" / "configs" / "debug.yaml"),
        "--trainer.strategy=lightning_dsv3.DSV3Strategy", "--trainer.strategy.ep=2", "--trainer.devices=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--data.seq_len=32", "--data.max_bytes=1048576", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_trains_and_resumes_with_expert_parallelism(tmp_path: Path) -> None:
    first = _recipe(tmp_path, "--trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "runs/debug/version_0/checkpoints/last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    second = _recipe(tmp_path, "--trainer.max_steps=6", f"--ckpt_path={ckpt}")
    assert second.returncode == 0, second.stderr[-3000:]
    lines = (tmp_path / "runs/debug/version_1/metrics.csv").read_text().splitlines()
    steps = {
        int(row.split(",")[header.index("step")]) for header in [lines[0].split(",")] for row in lines[1:]
    }
    assert steps and min(steps) >= 4  # training went on from the checkpoint's step, not from zero
