"""The way users launch: torchrun, SLURM's srun or mpirun starts the processes, the recipe trains (and
resumes) through the strategy."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _recipe_args(*extra: str) -> list[str]:
    return [
        str(ROOT / "recipes" / "train.py"), "fit",
        "--config", str(ROOT / "recipes" / "configs" / "debug.yaml"),
        "--trainer.strategy=lightning_dsv3.DSV3Strategy", "--trainer.strategy.ep=2", "--trainer.devices=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--data.seq_len=32", "--data.max_bytes=1048576", *extra,
    ]  # fmt: skip


def _recipe(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or ""
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", *_recipe_args(*extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_style_launch_is_picked_up_by_lightnings_slurm_environment(tmp_path: Path) -> None:
    """Two tasks started as `srun --ntasks-per-node=2` starts them (the SLURM_* variables it sets):
    Lightning's SLURMEnvironment gives the ranks, and the strategy must not start processes itself
    (if it did, each task would start another and the run would fail)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dsv3-test", "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        env.pop("LOCAL_RANK", None)
        cmd = [sys.executable, *_recipe_args("--trainer.max_steps=3")]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, **pipes))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    started = "".join(err for _, err in outs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in started and "GLOBAL_RANK: 1, MEMBER: 2/2" in started
    assert (tmp_path / "runs/debug/version_0/metrics.csv").is_file()


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


@pytest.mark.skipif(
    shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs an MPI (mpirun) and mpi4py, which Lightning's MPIEnvironment reads the ranks with",
)
def test_mpirun_launch_is_picked_up_by_lightnings_mpi_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK"))}
    env.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "--oversubscribe", "-np", "2", sys.executable, *_recipe_args("--trainer.max_steps=3")]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    started = out.stdout + out.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in started and "GLOBAL_RANK: 1, MEMBER: 2/2" in started
    assert (tmp_path / "runs/debug/version_0/metrics.csv").is_file()
