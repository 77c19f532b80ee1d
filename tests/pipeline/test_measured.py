"""Simulator costs from a measured step: a step's recorded actions, costed per rank and chunk, give back
the step even where stages do unequal work; fused and split actions are matched to the schedule's."""

from __future__ import annotations

import pytest

from lightning_dsv3.pipeline import (
    Action,
    Costs,
    MeasuredCosts,
    Op,
    PipelineSchedule,
    as_recorded,
    make_schedule,
    medians_by_kind,
    simulate,
    step_durations,
)
from lightning_dsv3.pipeline.measured import Recorded

COSTS = Costs(f=1.0, b=2.5, w=1.0, fb=3.0)
FREE = Costs(f=0.0, b=0.0)  # only the P2P latency of `simulate`'s costs is read with an action_cost


def _unequal_step(schedule: PipelineSchedule) -> tuple[float, list[Recorded]]:
    """A simulated step whose rank 1 takes twice as long per action: (makespan, actions per rank)."""
    sim = simulate(schedule, COSTS, lambda rank, action: COSTS.of(action.op) * (1 + rank))
    return sim.makespan, as_recorded(sim)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_per_stage_medians_give_back_a_step_of_unequal_stages(name: str) -> None:
    schedule = make_schedule(name, 2, 8)
    makespan, ranks = _unequal_step(schedule)
    durations = step_durations(ranks)
    assert simulate(schedule, FREE, MeasuredCosts(durations)).makespan == pytest.approx(makespan)
    assert simulate(schedule, FREE, MeasuredCosts(durations, by="own")).makespan == pytest.approx(makespan)
    # one median per kind misses the slow rank
    assert simulate(schedule, FREE, MeasuredCosts(durations, by="kind")).makespan < 0.9 * makespan


def test_a_b_fused_with_its_w_costs_the_bw_that_ran() -> None:
    """The runtime runs a B followed at once by its W as one BW: the B costs it all, the W nothing."""
    schedule = make_schedule("zb1p", 2, 4)
    makespan, ranks = _unequal_step(schedule)
    fused: list[Recorded] = []
    for actions in ranks:
        out: Recorded = []
        for name, start, end in actions:
            if out and name.startswith("W(") and out[-1][0] == "B" + name[1:]:
                out[-1] = ("BW" + name[1:], out[-1][1], end)
            else:
                out.append((name, start, end))
        fused.append(out)
    assert any(name.startswith("BW(") for name, _, _ in fused[0])
    for by in ("stage", "own"):
        costs = MeasuredCosts(step_durations(fused), by=by)
        assert simulate(schedule, FREE, costs).makespan == pytest.approx(makespan)


def test_actions_that_ran_in_another_form_cost_what_ran() -> None:
    """Torch's schedules run an FB as F then a backward, and may split what ours runs as one BW."""
    durations = [{"F(2.0)": 1.0, "BW(0.1)": 2.5, "B(1.1)": 1.5, "W(1.1)": 1.0, "F(3.0)": 3.0}]
    own = MeasuredCosts(durations, by="own")
    assert own(0, Action(Op.FB, 2, 0, 0, 1)) == 3.5
    assert own(0, Action(Op.BW, 1, 1)) == 2.5
    assert own(0, Action(Op.B, 0, 1)) == 2.5 and own(0, Action(Op.W, 0, 1)) == 0.0
    assert MeasuredCosts(durations)(0, Action(Op.F, 2, 0)) == 2.0  # median of F on chunk 0
    with pytest.raises(KeyError, match="F\\(5.0\\)"):
        own(0, Action(Op.F, 5, 0))


def test_one_median_per_kind_pools_every_rank_and_chunk() -> None:
    durations = [{"F(0.0)": 1.0, "F(0.1)": 2.0}, {"F(0.0)": 4.0, "BW(0.0)": 5.0}]
    assert medians_by_kind(durations) == {"F": 2.0, "BW": 5.0}
    assert MeasuredCosts(durations, by="kind")(1, Action(Op.F, 0, 0)) == 2.0
    assert MeasuredCosts(durations, by="stage")(1, Action(Op.F, 0, 0)) == 4.0
    with pytest.raises(ValueError, match="MeasuredCosts.by"):
        MeasuredCosts(durations, by="rank")
