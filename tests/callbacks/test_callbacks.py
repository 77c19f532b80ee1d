"""Each callback in one process under Lightning's default strategy, read back from the CSV log."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from callback_checks import OVERRIDES, PEAK_FLOPS, SEQ, csv_metrics, fit
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_dsv3.callbacks import CommunicationStats, MemoryProfiler, PipelineTimeline
from lightning_dsv3.callbacks.timeline import Bar, bubble_fractions, parse_action, predicted
from lightning_dsv3.config import ParallelConfig, get_preset
from lightning_dsv3.flops import train_flops
from lightning_dsv3.pipeline import (
    Costs,
    MeasuredCosts,
    as_recorded,
    dualpipev,
    medians_by_kind,
    simulate,
    step_durations,
)
from lightning_dsv3.plan import recommend

BATCH = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four steps, every callback, validation after two; the rows logged and the callbacks."""
    root = tmp_path_factory.mktemp("callbacks")
    logger = CSVLogger(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cbs, module = fit(root, logger, steps=4, every_n_steps=2, global_batch=BATCH, val_every=2)
    rows = csv_metrics(logger)
    return {
        "root": root,
        "rows": rows,
        "cbs": cbs,
        "module": module,
        "warnings": [str(w.message) for w in caught],
    }


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_memory_uses_cpu_counters_and_tensor_bytes(run: dict) -> None:
    rows = run["rows"]
    params = _values(rows, "memory/rank0/params_mib")
    assert len(params) == 4 and params[0] > 0
    assert _values(rows, "memory/rank0/grads_mib") == pytest.approx(params)  # every weight is trained
    assert _values(rows, "memory/rank0/optimizer_mib") == pytest.approx(
        [2 * p for p in params], rel=1e-3
    )  # AdamW
    rss, peak = _values(rows, "memory/rank0/rss_mib"), _values(rows, "memory/rank0/peak_rss_mib")
    assert all(0 < r <= p * 1.01 for r, p in zip(rss, peak))
    assert "memory/rank0/allocated_mib" not in rows[0]  # CUDA counters only on GPUs
    assert (run["root"] / "memory" / "memory_step000004.png").is_file()


def test_memory_recommendations_after_the_first_epoch(run: dict) -> None:
    """The planner's advice, given the run's sizes and the other callbacks' worst imbalance."""
    memory, experts = run["cbs"]["memory"], run["cbs"]["experts"]
    imbalance = max(max(v["load"]) * len(v["load"]) / sum(v["load"]) for v in experts.last.values())
    assert memory.measured == {
        "micro_batch_size": BATCH, "seq_len": SEQ, "precision": "32-true", "device": "cpu",
        "expert_load_imbalance": pytest.approx(imbalance),
    }  # fmt: skip
    config = get_preset("debug", **OVERRIDES)
    assert memory.recommendations == recommend(config, ParallelConfig(dp=1, zero=False), memory.measured)


def test_expert_load_is_read_before_the_module_resets_it(run: dict) -> None:
    """The counts of the last step are one batch's (tokens x top_k per layer), and the bias after the
    run is the bias read plus the module's update from those counts: the callback ran first."""
    monitor = run["cbs"]["experts"]
    config = get_preset("debug", **OVERRIDES)
    assert list(monitor.last) == ["layers.1", "layers.2", "layers.3", "mtp.0.block"]
    for layer, seq in (("layers.1", SEQ), ("mtp.0.block", SEQ - 1)):  # MTP depth 1 sees seq - 1 positions
        assert sum(monitor.last[layer]["load"]) == BATCH * seq * config.n_activated_experts
    router = run["module"].model.layers["2"].ffn.router
    load, bias = (
        torch.tensor(monitor.last["layers.2"]["load"]),
        torch.tensor(monitor.last["layers.2"]["bias"]),
    )
    expected = bias + config.bias_update_speed * torch.sign(load.mean() - load)
    assert torch.allclose(router.e_score_correction_bias, expected)
    rows = run["rows"]
    assert len(_values(rows, "experts/max_violation/layers.1")) == 2  # steps 2 and 4
    assert max(_values(rows, "experts/max_violation")) > 0
    assert sorted(p.name for p in (run["root"] / "experts").glob("*.png")) == [
        "experts_step000002.png", "experts_step000004.png",
    ]  # fmt: skip


def test_throughput_logs_tokens_flops_and_mfu(run: dict) -> None:
    rows = run["rows"]
    config = get_preset("debug", **OVERRIDES)
    tokens = _values(rows, "train/device/items_per_sec")
    flops = _values(rows, "train/device/flops_per_sec")
    assert tokens and len(tokens) == len(flops)
    per_token = train_flops(config, BATCH, SEQ) / (BATCH * SEQ)
    assert [f / t for f, t in zip(flops, tokens)] == pytest.approx([per_token] * len(flops))
    assert _values(rows, "train/device/mfu") == pytest.approx([f / PEAK_FLOPS for f in flops])
    val_flops, val_tokens = (
        _values(rows, "validate/device/flops_per_sec"),
        _values(rows, "validate/device/items_per_sec"),
    )
    assert val_flops and [f / t for f, t in zip(val_flops, val_tokens)] == pytest.approx(
        [per_token / 3] * len(val_flops)
    )


def test_callbacks_without_data_warn_once(run: dict) -> None:
    messages = run["warnings"]
    assert sum("communication_stats" in m for m in messages) == 1
    assert sum("runs no pipeline" in m for m in messages) == 1


class _Telemetry(SingleDeviceStrategy):
    """A strategy with communication telemetry: bytes grow by 1 KiB per call."""

    calls = 0

    def communication_stats(self) -> dict[str, float]:
        self.calls += 1
        return {"comm/ep.dispatch/bytes": 1024.0 * self.calls, "comm/ep.dispatch/compression_ratio": 2.0}


def test_communication_stats_logs_the_strategy_dict_every_n_steps(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    stats = CommunicationStats(every_n_steps=2)
    fit(
        tmp_path,
        logger,
        steps=4,
        every_n_steps=2,
        strategy=_Telemetry(torch.device("cpu")),
        extra={"comm": stats},
    )
    rows = csv_metrics(logger)
    key = "comm/ep.dispatch/bytes"
    logged = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    assert logged == [(2, 1024.0), (4, 2048.0)]
    assert _values(rows, "comm/ep.dispatch/compression_ratio") == [2.0, 2.0]


def test_measured_timeline_round_trips_through_the_simulator() -> None:
    """Actions taken from a simulated DualPipeV step give back its costs and its bubble fractions."""
    schedule = dualpipev(2, 4)
    sim = simulate(schedule, Costs(f=1.0, b=2.0, w=0.5, fb=2.5))
    recorded = as_recorded(sim)
    durations = step_durations(recorded)
    assert medians_by_kind(durations) == pytest.approx({"F": 1.0, "B": 1.5, "W": 0.5, "BW": 2.0, "FB": 2.5})
    bubble, span = bubble_fractions([[parse_action(*action) for action in actions] for actions in recorded])
    assert span == sim.makespan
    assert bubble == pytest.approx([b / sim.makespan for b in sim.bubble])
    _, sim_bubble, sim_span = predicted(schedule, durations)
    assert (sim_bubble, sim_span) == (pytest.approx(bubble), span)
    assert parse_action("FB(4.0|1.1)", 0.0, 1.0) == Bar("FB", "4|1", 0, 0.0, 1.0)


def test_timeline_predicts_a_step_of_unequal_stages(tmp_path: Path) -> None:
    """Rank 1's actions take twice as long, as where stages do unequal work (DualPipeV on mini): the
    logged prediction, from each rank and chunk's medians, is the measured step; one median per kind
    over every rank would fall short of it."""
    schedule = dualpipev(2, 8)
    costs = Costs(f=1.0, b=2.5, w=1.0, fb=3.0)
    sim = simulate(schedule, costs, lambda rank, action: costs.of(action.op) * (1 + rank))
    recorded = as_recorded(sim)
    logger = CSVLogger(tmp_path)
    trainer, timeline = SimpleNamespace(loggers=[logger]), PipelineTimeline(dirpath=tmp_path / "timeline")
    timeline.setup(trainer, None, "fit")
    timeline._report(trainer, schedule, recorded, step=1)
    assert timeline.last_path == tmp_path / "timeline" / "timeline_step000001.png"
    (row,) = csv_metrics(logger)
    assert float(row["pipeline/step_ms"]) == pytest.approx(sim.makespan * 1e3)
    assert float(row["pipeline/step_ms_predicted"]) == pytest.approx(sim.makespan * 1e3)
    per_kind = MeasuredCosts(step_durations(recorded), by="kind")
    assert simulate(schedule, Costs(f=0.0, b=0.0), per_kind).makespan < 0.9 * sim.makespan


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counters_and_snapshots(tmp_path: Path) -> None:
    memory = MemoryProfiler(snapshot_steps=(2,), dirpath=tmp_path)
    logger = CSVLogger(tmp_path)
    fit(tmp_path, logger, steps=2, every_n_steps=1, accelerator="gpu", extra={"memory": memory})
    rows = csv_metrics(logger)
    assert _values(rows, "memory/rank0/peak_mib")[-1] >= _values(rows, "memory/rank0/allocated_mib")[-1] > 0
    assert (tmp_path / "snapshot_rank0_step2.pickle").is_file()
