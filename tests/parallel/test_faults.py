"""Faults on 2 gloo ranks: non-finite steps skipped together or stopped, a stuck collective named."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from fault_checks import (
    mesh_group_timeouts,
    nonfinite_run,
    read_losses,
    recipe_losses,
    stuck_collective_worker,
)

from lightning_dsv3.parallel.expert import is_expert_param

# sgd: the host reads the check back and drops the gradients; adamw-fused: the device's flag skips the
# fused step (found_inf) and the host reads it one step later
OPTIMS = ["sgd", "adamw-fused"]


@pytest.mark.parametrize("optim", OPTIMS)
def test_a_nonfinite_loss_skips_the_step_on_every_rank(pool2, optim) -> None:
    results = pool2.run(nonfinite_run, {"ep": 2}, (1,), "loss", 4, {}, optim)
    for r in results:
        assert r["skipped"] == 1 and r["logged_skipped"] == 1.0
        assert math.isnan(r["losses"][1]) and all(
            math.isfinite(x) for i, x in enumerate(r["losses"]) if i != 1
        )
        before, skipped, after = r["states"][0], r["states"][1], r["states"][2]
        for name, value in skipped.items():  # parameters, optimizer-free buffers and router biases alike
            assert torch.equal(value, before[name]), name
        assert any(not torch.equal(after[n], skipped[n]) for n in after)  # training went on
        biases = [n for n in skipped if n.endswith("e_score_correction_bias")]
        assert biases and all(torch.isfinite(skipped[n]).all() for n in biases)
    for name, value in results[0]["states"][-1].items():  # replicas stayed identical
        if not is_expert_param(name):
            assert torch.equal(value, results[1]["states"][-1][name]), name


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("steps", [4, 3], ids=["mid-run", "last-step"])
def test_consecutive_nonfinite_gradients_stop_with_the_step_and_layer(pool2, optim, steps) -> None:
    """pp=2: the poisoned parameter lives on one pipeline rank; both stop with its name (also when the
    streak ends on the last step, whose device verdict is read as training ends)."""
    layout = {"pp": 2, "schedule": "1f1b", "n_microbatches": 2}
    with pytest.raises(AssertionError) as info:
        policy = {"max_consecutive_nonfinite": 2}
        pool2.run(nonfinite_run, layout, (1, 2), "layers.2.attn.wq_b.weight", steps, policy, optim)
    message = str(info.value)
    stop = (
        "NonFiniteError: non-finite gradient of model.layers.2.attn.wq_b.weight (layer 2) at optimizer step 2"
    )
    assert message.count(stop) == 2  # every rank stops with the same message, none hangs
    assert "2 step(s) in a row" in message and "the streak began at step 1" in message


@pytest.mark.parametrize("optim", OPTIMS)
def test_raise_policy_stops_at_the_first_nonfinite_loss(pool2, optim) -> None:
    with pytest.raises(AssertionError, match=r"NonFiniteError: non-finite loss and gradient of model\.embed"):
        pool2.run(nonfinite_run, {"dp": 2}, (0,), "loss", 2, {"nonfinite": "raise"}, optim)


def test_the_strategy_timeout_reaches_every_mesh_group(pool4) -> None:
    """dp=2 x ep=2: the dp and ep groups are subgroups, which torch would give its 30-minute default."""
    for timeouts in pool4.run(mesh_group_timeouts, {"dp": 2, "ep": 2}, 97.0):
        assert {"dp", "ep"} <= timeouts.keys() and set(timeouts.values()) == {97.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stuck_collective_fails_with_its_operation_group_and_ranks() -> None:
    """Rank 1 stalls before a step; rank 0's expert all-to-all gives up after the strategy's timeout."""
    ctx = mp.get_context("spawn")
    results, start, release = ctx.Queue(), ctx.Barrier(2), ctx.Event()
    port, timeout_s = _free_port(), 6.0
    procs = [
        ctx.Process(target=stuck_collective_worker, args=(r, port, timeout_s, results, start, release))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        outcome = dict(results.get(timeout=240) for _ in range(2))
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    error = outcome[0]
    assert error is not None and error.startswith("CollectiveError: expert dispatch_counts all_to_all")
    assert "over the ep group (global ranks [0, 1]) failed after" in error
    waited = float(error.split("failed after ")[1].split(" s")[0])
    assert timeout_s - 0.5 <= waited < 4 * timeout_s
    assert "raise DSV3Strategy(timeout=...)" in error
    assert outcome[1] is not None and "CollectiveError" in outcome[1]  # the stalled rank fails too


# ---- kill and resume under torchrun ---------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY, KILL_AT = 8, 2, 5
RUN_CONFIG = """
trainer:
  devices: 2
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  strategy:
    class_path: lightning_dsv3.DSV3Strategy
    init_args: {{ep: 2}}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}/runs, name: run, flush_logs_every_n_steps: 1}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        {{dirpath: {root}/checkpoints, every_n_train_steps: {every}, save_last: true, monitor: step,
         mode: max, save_top_k: 2}}
{kill}
data: {{seq_len: 32, max_bytes: 262144}}
"""
KILL = f"    - {{class_path: fault_checks.KillOnce, init_args: {{step: {KILL_AT}, rank: 1}}}}"


def _args(root: Path, kill: bool) -> list[str]:
    """The debug recipe with ep=2, a checkpoint every SAVE_EVERY steps and auto-resume (ckpt_path=last)."""
    config = root / "run.yaml"
    config.write_text(RUN_CONFIG.format(root=root, steps=STEPS, every=SAVE_EVERY, kill=KILL if kill else ""))
    debug = ROOT / "recipes" / "configs" / "debug.yaml"
    return ["fit", "--config", str(debug), "--config", str(config), "--ckpt_path=last"]


@pytest.fixture(scope="module")
def uninterrupted(pool2, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the recipe run twice over 2 ranks without a fault: they must be identical."""
    runs = []
    for _ in range(2):
        root = tmp_path_factory.mktemp("uninterrupted")
        runs.append(pool2.run(recipe_losses, _args(root, kill=False), str(root / "runs/run/version_0"))[0])
    assert sorted(runs[0]) == list(range(STEPS))
    assert runs[0] == runs[1]  # determinism: same config and seed, same losses, bit for bit
    return runs[0]


def test_the_recipe_is_deterministic_over_two_ranks(uninterrupted) -> None:
    assert all(math.isfinite(v) for v in uninterrupted.values())


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_a_rank_killed_mid_epoch_resumes_without_losing_or_repeating_a_step(tmp_path, uninterrupted) -> None:
    """torchrun restarts the group after SIGKILL; the recipe resumes from `last`, equal to an unbroken run."""
    cmd = [
        shutil.which("torchrun"), "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        "--max-restarts", "1", "--monitor-interval", "0.5", str(ROOT / "recipes" / "train.py"),
        *_args(tmp_path, kill=True),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    first, second = (read_losses(tmp_path / f"runs/run/version_{v}/metrics.csv") for v in (0, 1))
    resumed_from = KILL_AT // SAVE_EVERY * SAVE_EVERY  # the last checkpoint before the kill
    assert max(first) < KILL_AT  # the first attempt died at the kill
    assert sorted(second) == list(range(resumed_from, STEPS))  # nothing skipped, nothing run twice
    assert "Restoring states from the checkpoint path at" in run.stdout + run.stderr
    for step, loss in {**first, **second}.items():
        assert loss == uninterrupted[step], step  # the same batches and the same state: the same bits
    meta = torch.load(tmp_path / "checkpoints/last.ckpt/meta.pt", weights_only=False)
    (position,) = meta["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["epoch"] == 0 and position["consumed"] == STEPS * 16 * 2  # the data position travels
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert len(list((tmp_path / "checkpoints").glob("epoch=*"))) == 2  # save_top_k=2 on step: the last two
