"""How benchmarks/pipeline_schedules.py feeds the simulator: a step's measured actions, replayed, give
back the step; stages of unequal cost need per-stage costs; fused and split actions are matched to
the schedule's."""

from __future__ import annotations

import pytest

from benchmarks.pipeline_schedules import MeasuredCosts, Recorded, predictions
from lightning_dsv3.pipeline import Action, Costs, Op, PipelineSchedule, make_schedule, simulate

COSTS = Costs(f=1.0, b=2.5, w=1.0, fb=3.0)


def _rank_1_twice_as_slow(rank: int, action: Action) -> float:
    return COSTS.of(action.op) * (2.0 if rank == 1 else 1.0)


def _recorded(schedule: PipelineSchedule) -> tuple[float, list[Recorded]]:
    """A simulated step with unequal stages, as the benchmark records one: (makespan, actions per rank)."""
    sim = simulate(schedule, COSTS, _rank_1_twice_as_slow)
    ranks: list[Recorded] = [[] for _ in range(schedule.pp)]
    for record in sim.records:
        if not record.action.op.is_comm:
            ranks[record.rank].append((str(record.action), record.start, record.end))
    return sim.makespan, ranks


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_per_stage_costs_give_back_a_step_of_unequal_stages(name: str) -> None:
    schedule = make_schedule(name, 2, 8)
    makespan, ranks = _recorded(schedule)
    predicted = predictions(schedule, ranks, p2p_s=0.0)
    assert predicted["stage"][0] == pytest.approx(makespan)
    assert predicted["replay+p2p"][0] == pytest.approx(makespan)
    assert predicted["kind"][0] < 0.9 * makespan  # one median per kind misses the slow rank


def test_transfer_time_lengthens_each_hop_of_the_critical_path() -> None:
    schedule = make_schedule("1f1b", 2, 8)
    makespan, ranks = _recorded(schedule)
    predicted = predictions(schedule, ranks, p2p_s=0.25)
    # rank 0's last backward waits for its micro-batch's activation to go and its gradient to come back
    assert predicted["stage+p2p"][0] == pytest.approx(makespan + 2 * 0.25)


def test_a_b_fused_with_its_w_costs_the_bw_that_ran() -> None:
    """The runtime runs a B followed at once by its W as one BW: the B costs it all, the W nothing."""
    schedule = make_schedule("zb1p", 2, 4)
    makespan, ranks = _recorded(schedule)
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
    predicted = predictions(schedule, fused, p2p_s=0.0)
    assert predicted["replay+p2p"][0] == pytest.approx(makespan)
    assert predicted["stage"][0] == pytest.approx(makespan)


def test_actions_that_ran_in_another_form_cost_what_ran() -> None:
    """Torch's schedules run an FB as F then a backward, and may split what ours runs as one BW."""
    durations = [{"F(2.0)": 1.0, "BW(0.1)": 2.5, "B(1.1)": 1.5, "W(1.1)": 1.0, "F(3.0)": 3.0}]
    own = MeasuredCosts(durations, typical=False)
    assert own(0, Action(Op.FB, 2, 0, 0, 1)) == 3.5
    assert own(0, Action(Op.BW, 1, 1)) == 2.5
    assert own(0, Action(Op.B, 0, 1)) == 2.5 and own(0, Action(Op.W, 0, 1)) == 0.0
    assert MeasuredCosts(durations, typical=True)(0, Action(Op.F, 2, 0)) == 2.0  # median of F on chunk 0
    with pytest.raises(KeyError, match="F\\(5.0\\)"):
        own(0, Action(Op.F, 5, 0))
