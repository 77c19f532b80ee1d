"""How benchmarks/pipeline_schedules.py feeds the simulator: each feeding of the prediction table, on a
step of unequal stages (the costing itself is tested in tests/pipeline/test_measured.py)."""

from __future__ import annotations

import pytest

from benchmarks.pipeline_schedules import FEEDINGS, predictions
from lightning_dsv3.pipeline import Costs, PipelineSchedule, as_recorded, make_schedule, simulate
from lightning_dsv3.pipeline.measured import Recorded

COSTS = Costs(f=1.0, b=2.5, w=1.0, fb=3.0)


def _unequal_step(schedule: PipelineSchedule) -> tuple[float, list[Recorded]]:
    """A simulated step whose rank 1 takes twice as long per action: (makespan, actions per rank)."""
    sim = simulate(schedule, COSTS, lambda rank, action: COSTS.of(action.op) * (1 + rank))
    return sim.makespan, as_recorded(sim)


def test_per_stage_feedings_give_back_a_step_of_unequal_stages() -> None:
    schedule = make_schedule("dualpipev", 2, 8)
    makespan, ranks = _unequal_step(schedule)
    predicted = predictions(schedule, ranks, p2p_s=0.0)
    assert list(predicted) == list(FEEDINGS)
    assert predicted["stage"][0] == pytest.approx(makespan)
    assert predicted["replay+p2p"][0] == pytest.approx(makespan)
    assert predicted["kind"][0] < 0.9 * makespan  # one median per kind misses the slow rank


def test_transfer_time_lengthens_each_hop_of_the_critical_path() -> None:
    schedule = make_schedule("1f1b", 2, 8)
    makespan, ranks = _unequal_step(schedule)
    predicted = predictions(schedule, ranks, p2p_s=0.25)
    # rank 0's last backward waits for its micro-batch's activation to go and its gradient to come back
    assert predicted["stage+p2p"][0] == pytest.approx(makespan + 2 * 0.25)
