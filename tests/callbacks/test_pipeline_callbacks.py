"""The callbacks under DSV3Strategy on two gloo ranks: pp=2 (DualPipeV) logging to W&B offline, and
ep=2 logging to CSV; the expert-load monitor under Lightning's DDP and its collectives under dp=2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from callback_checks import (
    OVERRIDES,
    PEAK_FLOPS,
    SEQ,
    ddp_expert_load_run,
    dsv3_all_reduce_count_run,
    expert_parallel_run,
    pipeline_run,
    wandb_history,
    wandb_image_keys,
    wandb_run_dir,
)
from matplotlib.image import imread

from lightning_dsv3.config import get_preset


@pytest.fixture(scope="module")
def run(pool2, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pp2")
    results = pool2.run(pipeline_run, str(root))
    run_dir = wandb_run_dir(root)
    return {"rank0": results[0], "history": wandb_history(run_dir), "images": wandb_image_keys(run_dir)}


def test_timeline_png_and_bubbles(run: dict) -> None:
    image = imread(run["rank0"]["timeline"])
    assert image.shape[0] > 200 and image.shape[1] > 800  # a readable chart, not an empty canvas
    logged = {k: v for row in run["history"] for k, v in row.items() if k.startswith("pipeline/")}
    for rank in (0, 1):
        assert 0 <= logged[f"pipeline/bubble/rank{rank}"] < 1
        assert 0 <= logged[f"pipeline/bubble_predicted/rank{rank}"] < 1
    assert logged["pipeline/step_ms"] > 0 and logged["pipeline/step_ms_predicted"] > 0
    assert {"pipeline/cost_ms/F", "pipeline/cost_ms/FB", "pipeline/cost_ms/W"} <= logged.keys()


def test_every_rank_and_stage_reaches_rank_zero(run: dict) -> None:
    rank0 = run["rank0"]
    assert rank0["layers"] == ["layers.1", "layers.2", "layers.3", "mtp.0.block"]  # both ranks' layers
    assert {s["rank"]: s["stages"] for s in rank0["memory"]} == {0: (0, 3), 1: (1, 2)}  # DualPipeV's V


def test_recommendations_see_the_measured_bubble(run: dict) -> None:
    measured = run["rank0"]["measured"]
    assert measured["micro_batch_size"] == 2  # 8 sequences in DualPipeV's 2 x pp micro-batches
    assert 0 <= measured["bubble_fraction"] < 1  # the timeline's worst rank
    advised = any(line.startswith("pipeline:") for line in run["rank0"]["recommendations"])
    assert advised == (measured["bubble_fraction"] > 0.1)  # recommend's threshold, either way


def test_wandb_history_and_images(run: dict) -> None:
    keys = {k for row in run["history"] for k in row}
    assert {
        "memory/rank0/rss_mib", "memory/rank1/params_mib", "experts/max_violation/layers.3",
        "experts/bias_spread/mtp.0.block", "train/device/items_per_sec", "train/device/mfu",
        "pipeline/bubble_table/_type", "experts/load/_type", "memory/samples/_type",
    } <= keys  # fmt: skip
    assert run["images"] == {"pipeline/timeline", "experts/heatmap", "memory/plot"}
    # a pipeline "device" is the pipeline: its peak is pp x one device's
    row = next(r for r in run["history"] if "train/device/mfu" in r)
    assert row["train/device/mfu"] == pytest.approx(row["train/device/flops_per_sec"] / (2 * PEAK_FLOPS))


def test_expert_parallel_communication_and_global_loads(pool2, tmp_path: Path) -> None:
    """ep=2: each rank's dispatch telemetry under its own key, and expert loads summed over both
    data slices (2 x batch x seq x top_k tokens per layer)."""
    rank0 = pool2.run(expert_parallel_run, str(tmp_path))[0]
    keys = {k for row in rank0["rows"] for k, v in row.items() if v}
    for rank in (0, 1):
        assert {f"comm/ep.dispatch/bytes/rank{rank}", f"comm/ep.dispatch/bytes_sent/rank{rank}"} <= keys
    config = get_preset("debug", **OVERRIDES)
    assert sum(rank0["experts"]["layers.1"]["load"]) == 2 * 8 * SEQ * config.n_activated_experts
    assert {"train/items_per_sec", "train/device/items_per_sec"} <= keys  # two data-parallel replicas


def test_expert_loads_under_lightning_ddp_are_summed_over_ranks(pool2, tmp_path: Path) -> None:
    """Lightning's DDP has no reduce_expert_loads: the module sums the ranks' counts for the bias update
    (so the replicas' biases stay identical) and the monitor reports those, so the heatmap's loads and
    the logged violation are the global batch's, not rank 0's share."""
    results = pool2.run(ddp_expert_load_run, str(tmp_path))
    assert results[0]["biases"] == results[1]["biases"]
    assert any(any(b != 0 for b in bias) for bias in results[0]["biases"].values())  # they moved
    local = [r["local"] for r in results]
    assert local[0] != local[1]  # each rank routed its own tokens
    last = results[0]["last"]
    assert list(last) == list(local[0])
    for layer, v in last.items():
        total = torch.tensor(local[0][layer]) + torch.tensor(local[1][layer])
        assert v["load"] == total.tolist(), layer
    logged = [r for r in results[0]["rows"] if r.get("experts/max_violation/layers.1")][-1]
    total = torch.tensor(last["layers.1"]["load"])
    assert float(logged["experts/max_violation/layers.1"]) == pytest.approx(
        float(total.max() / total.mean() - 1)
    )
    assert (tmp_path / "experts" / "experts_step000002.png").is_file()


def test_expert_load_monitor_adds_no_all_reduce_under_dsv3(pool2, tmp_path: Path) -> None:
    """dp=2: the module already sums the counts for the bias update and the monitor reads those, so a
    step it reports issues as many all_reduce calls as one without it; the loads are still global."""
    results = pool2.run(dsv3_all_reduce_count_run, str(tmp_path), {"dp": 2})
    for r in results:
        assert r["with"] == r["without"] and len(r["with"]) == 3
    config = get_preset("debug", **OVERRIDES)
    for layer, seq in (("layers.1", SEQ), ("mtp.0.block", SEQ - 1)):  # two data slices of 8 sequences
        assert sum(results[0]["last"][layer]["load"]) == 2 * 8 * seq * config.n_activated_experts
