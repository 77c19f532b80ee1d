"""Measured stage costs: what they time, and how they cut the stages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_dsv3.config import get_preset
from lightning_dsv3.pipeline import make_schedule
from lightning_dsv3.pipeline.costs import StageCosts, measure_stage_costs
from lightning_dsv3.pipeline.partition import partition
from lightning_dsv3.pipeline.stages import StagePlan

CONFIG = get_preset("debug", max_seq_len=16, original_seq_len=16)


def test_each_layer_gets_the_time_of_its_kind() -> None:
    costs = measure_stage_costs(CONFIG, "cpu", micro_batch=1, precision="32-true", repeats=2)
    assert len(costs.layers) == CONFIG.n_layers
    assert costs.head > 0 and costs.embed > 0 and all(c > 0 for c in costs.layers)
    by_kind: dict[bool, set[float]] = {}
    for i, c in enumerate(costs.layers):
        by_kind.setdefault(CONFIG.is_moe_layer(i), set()).add(c)
    assert all(len(times) == 1 for times in by_kind.values())  # one timing per kind, shared


def test_the_embedding_cost_moves_layers_off_the_first_stage() -> None:
    flat = [1.0] * CONFIG.n_layers
    even = partition(CONFIG, 2, layer_costs=flat, head_cost=0.0)
    heavy = partition(CONFIG, 2, layer_costs=flat, head_cost=0.0, embed_cost=2.0)
    assert len(heavy[0]) == len(even[0]) - 1


def test_a_stage_plan_cuts_by_measured_costs() -> None:
    n = CONFIG.n_layers
    schedule = make_schedule("1f1b", 2, 2)
    costly_head = StageCosts(layers=(1.0,) * n, head=float(n))
    assert list(StagePlan.build(CONFIG, schedule, layer_costs=costly_head).layers[1]) == [n - 1]
    free_head = StageCosts(layers=(1.0,) * n, head=0.0)
    assert [len(r) for r in StagePlan.build(CONFIG, schedule, layer_costs=free_head).layers] == [n // 2] * 2


def test_the_command_prints_both_cuts() -> None:
    args = [sys.executable, "-m", "lightning_dsv3.pipeline.costs", "--preset", "debug", "--seq-len", "16"]
    out = subprocess.run([*args, "--precision", "32-true"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cut by these times: [(0, " in out.stdout and "cut by the FLOP model: [(0, " in out.stdout


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_low_precision_runs_on_cpu(precision: str) -> None:
    costs = measure_stage_costs(CONFIG, "cpu", precision=precision, repeats=1)
    assert min(costs.layers) > 0


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision='16-mixed' is not one of"):
        measure_stage_costs(CONFIG, "cpu", precision="16-mixed")
