"""Measured stage costs: what they time, and how they cut the stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dsv3.config import get_preset
from lightning_dsv3.pipeline import make_schedule
from lightning_dsv3.pipeline.costs import StageCosts, as_layer_costs, measure_stage_costs
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


def test_the_command_prints_both_cuts_and_saves_the_costs(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lightning_dsv3.pipeline.costs", "--preset", "debug", "--seq-len", "16"]
    path = tmp_path / "costs.json"
    out = subprocess.run(
        [*args, "--precision", "32-true", "--save", str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cut by these times: [(0, " in out.stdout and "cut by the FLOP model: [(0, " in out.stdout
    costs = StageCosts.load(path)
    assert len(costs.layers) == CONFIG.n_layers and costs.head > 0 and costs.embed > 0
    cut = out.stdout.split("cut by these times: ")[1].splitlines()[0]
    measured = partition(CONFIG, 2, 16, costs.layers, costs.head, costs.embed)
    assert cut == str([(r.start, r.stop) for r in measured])  # the file gives the cut the command printed


def test_a_strategy_cuts_by_a_costs_file(tmp_path: Path) -> None:
    from lightning_dsv3 import DSV3Strategy

    n = CONFIG.n_layers
    costs = StageCosts(layers=(1.0,) * n, head=float(n), embed=0.5)
    path = tmp_path / "costs.json"
    costs.save(path)
    assert StageCosts.load(path) == costs
    assert DSV3Strategy(pp=2, layer_costs=str(path)).parallel_config.layer_costs == costs


def test_the_planner_cuts_the_stages_as_the_strategy_does(tmp_path: Path) -> None:
    """`recipes/train.py plan` passes the strategy's layer_costs on: the plan's stages are the run's."""
    from lightning_dsv3.config import ParallelConfig
    from lightning_dsv3.plan.memory import stage_plan

    n = CONFIG.n_layers
    costs = StageCosts(layers=(1.0,) * n, head=0.0)  # an even cut, where the FLOP model loads stage 0
    path = tmp_path / "costs.json"
    costs.save(path)
    schedule = make_schedule("1f1b", 2, 2)
    expected = StagePlan.build(CONFIG, schedule, layer_costs=costs).layers
    assert expected != StagePlan.build(CONFIG, schedule).layers
    for given in (costs, str(path), {"layers": list(costs.layers), "head": costs.head}):
        parallel = ParallelConfig(pp=2, n_microbatches=2, layer_costs=as_layer_costs(given)).resolve(2)
        plan = stage_plan(CONFIG, parallel)
        assert plan is not None and plan.layers == expected
    per_layer = ParallelConfig(pp=2, n_microbatches=2, layer_costs=as_layer_costs([1.0] * n)).resolve(2)
    assert per_layer.layer_costs == (1.0,) * n  # a list becomes a tuple: the plan cache needs a hashable key
    with pytest.raises(TypeError, match="one cost per layer, a StageCosts or the path"):
        as_layer_costs(3.0)


@pytest.mark.parametrize(
    "text",
    ["", "{not json", json.dumps([1.0, 2.0]), json.dumps({"layers": [], "head": 1.0}),
     json.dumps({"layers": [1.0, -1.0], "head": 1.0}), json.dumps({"layers": [1.0], "head": True}),
     json.dumps({"layers": [1.0]})],
    ids=["empty", "not-json", "a-list", "no-layers", "negative", "boolean", "no-head"],
)  # fmt: skip
def test_a_bad_costs_file_is_refused_with_the_remedy(tmp_path: Path, text: str) -> None:
    path = tmp_path / "costs.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="--save"):
        StageCosts.load(path)


@pytest.mark.parametrize(
    "given",
    [{"layers": [-1.0, 1.0], "head": 0.0}, {"layers": "abc", "head": 0.0}, {"layers": [1.0]}, [1.0, 0.0], [],
     [float("nan")]],
    ids=["negative", "a-string", "no-head", "a-zero-layer", "empty", "nan"],
)  # fmt: skip
def test_bad_costs_in_any_form_are_refused(given: object) -> None:
    with pytest.raises(ValueError, match="positive|seconds"):
        as_layer_costs(given)


def test_costs_given_as_lists_are_kept_hashable() -> None:
    """The planner caches stage plans by the costs: a StageCosts made from a list keeps a tuple."""
    costs = StageCosts([1.0, 2.0], 0)  # type: ignore[arg-type]
    assert costs.layers == (1.0, 2.0) and isinstance(costs.head, float)
    assert hash(costs) == hash(StageCosts((1.0, 2.0), 0.0))
    with pytest.raises(ValueError, match="empty path"):
        as_layer_costs("")


def test_a_cluster_plan_takes_the_costs_file(tmp_path: Path) -> None:
    from lightning_dsv3.plan import GPUS
    from lightning_dsv3.plan.cluster import plan_cluster

    n = CONFIG.n_layers
    path = tmp_path / "costs.json"
    StageCosts(layers=(1.0,) * n, head=0.0).save(path)
    args = dict(config=CONFIG, gpus=2, gpu=GPUS["h100"], pp=2, ep=1, schedule="1f1b", precision="bf16-mixed",
                global_batch=4, seq_len=16, micro_batch_size=1)  # fmt: skip
    by_flops, measured = plan_cluster(**args), plan_cluster(**args, layer_costs=str(path))
    assert measured.parallel.layer_costs == StageCosts.load(path)
    stage0 = [plan.memory["this"].ranks[0].params_bytes for plan in (by_flops, measured)]
    assert stage0[0] != stage0[1]  # the FLOP cut loads stage 0 with 3 of 4 layers, the even cut with 2


def test_a_missing_costs_file_fails_when_the_strategy_is_made(tmp_path: Path) -> None:
    from lightning_dsv3 import DSV3Strategy

    with pytest.raises(ValueError, match="cannot read stage costs from .*missing.json"):
        DSV3Strategy(pp=2, layer_costs=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_low_precision_runs_on_cpu(precision: str) -> None:
    costs = measure_stage_costs(CONFIG, "cpu", precision=precision, repeats=1)
    assert min(costs.layers) > 0


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision='16-mixed' is not one of"):
        measure_stage_costs(CONFIG, "cpu", precision="16-mixed")
