"""Simulator: the published bubbles and activation peaks, invariants on every schedule, and rejection of
lists that cannot run."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dsv3.pipeline import (
    GENERATORS,
    Action,
    Costs,
    Op,
    PipelineSchedule,
    ScheduleError,
    dualpipe_min_microbatches,
    dualpipev_min_microbatches,
    insert_communication,
    make_schedule,
    simulate,
)

# Distinct costs, so that every term of a formula matters: B-W = 1.25 >= F >= W, 2W <= B, B <= F&B <= F+B.
F, B, W, FB = 1.0, 2.0, 0.75, 2.5
COSTS = Costs(f=F, b=B, w=W, fb=FB)


@pytest.mark.parametrize("pp", range(2, 9))
@pytest.mark.parametrize("n_per_pp", [0.5, 1, 2.5])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b_on_every_rank(pp: int, n_per_pp: float) -> None:
    result = simulate(make_schedule("1f1b", pp, max(1, int(n_per_pp * pp))), COSTS)
    assert result.bubble == pytest.approx([(pp - 1) * (F + B)] * pp, abs=1e-9)


@pytest.mark.parametrize("pp", range(2, 9))
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w_on_every_rank(pp: int, extra: int) -> None:
    """Holds from n_microbatches = pp up (fewer leave too few deferred W to fill the tail)."""
    result = simulate(make_schedule("zb1p", pp, pp + extra), COSTS)
    assert result.bubble == pytest.approx([(pp - 1) * (F + B - 2 * W)] * pp, abs=1e-9)


def _dual_cases() -> list[tuple[str, int, int, int]]:
    """(name, ranks, micro-batches, stages PP) from the smallest supported micro-batch count up."""
    cases = []
    for n_stages in (2, 4, 8):
        least = dualpipe_min_microbatches(n_stages)
        cases += [("dualpipe", n_stages, n, n_stages) for n in (least, 2 * n_stages, 2 * n_stages + 6)]
        ranks = n_stages // 2
        least = dualpipev_min_microbatches(ranks)
        cases += [("dualpipev", ranks, n, n_stages) for n in (least, 2 * ranks, 2 * ranks + 5)]
    return cases


@pytest.mark.parametrize(("name", "pp", "n", "n_stages"), _dual_cases())
def test_dualpipe_largest_bubble_is_published_formula(name: str, pp: int, n: int, n_stages: int) -> None:
    """DeepSeek-V3 Table 2 / DualPipe README: (PP/2-1)(F&B+B-3W), PP the number of stages."""
    result = simulate(make_schedule(name, pp, n), COSTS)
    assert result.max_bubble == pytest.approx((n_stages / 2 - 1) * (FB + B - 3 * W), abs=1e-9)
    turn = [pp // 2 - 1, pp // 2] if name == "dualpipe" else [pp - 1]
    assert all(result.bubble[r] == pytest.approx(result.max_bubble) for r in turn)


@pytest.mark.parametrize(("name", "pp", "n", "n_stages"), _dual_cases())
def test_dualpipe_bubble_when_forward_outlasts_input_backward(
    name: str, pp: int, n: int, n_stages: int
) -> None:  # noqa: E501
    """With F > B-W the forward is on the critical path: (PP/2-1)(F&B+F-2W) instead."""
    f, b, w, fb = 1.5, 2.0, 0.75, 3.0
    result = simulate(make_schedule(name, pp, n), Costs(f=f, b=b, w=w, fb=fb))
    assert result.max_bubble == pytest.approx((n_stages / 2 - 1) * (fb + f - 2 * w), abs=1e-9)


@pytest.mark.parametrize("pp", range(2, 9))
def test_1f1b_holds_pp_activations_on_rank_0(pp: int) -> None:
    result = simulate(make_schedule("1f1b", pp, 2 * pp), COSTS)
    assert result.peak_activations == tuple(pp - r for r in range(pp))


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipe_and_dualpipev_hold_pp_plus_1_activations(pp: int) -> None:
    """The report's PP+1 (in one chunk's activations), counting an FB's new forward before it frees."""
    for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
        result = simulate(make_schedule(name, ranks, 2 * ranks + 2), COSTS)
        assert result.peak_activations == (pp + 1,) * ranks


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, int, int]:
    name = draw(st.sampled_from(tuple(GENERATORS)))
    if name == "dualpipe":
        pp = 2 * draw(st.integers(1, 8))
        return name, pp, dualpipe_min_microbatches(pp) + 2 * draw(st.integers(0, pp))
    pp = draw(st.integers(2, 16))
    if name == "dualpipev":
        return name, pp, draw(st.integers(dualpipev_min_microbatches(pp), 3 * pp))
    if name == "interleaved_1f1b":
        return name, pp, pp * draw(st.integers(1, 3))
    return name, pp, draw(st.integers(1, 2 * pp + 2))


@settings(max_examples=60, deadline=None)
@given(requests())
def test_simulator_accepts_every_generated_schedule_and_conserves_work(request: tuple[str, int, int]) -> None:
    """Every rank's busy time is its compute; all ranks together do F+B per (micro-batch, stage)."""
    schedule = make_schedule(*request)
    costs = Costs(f=F, b=B, w=W)  # fb defaults to f + b, so overlapping neither adds nor saves work
    result = simulate(schedule, costs)
    assert sum(result.busy) == pytest.approx(schedule.n_microbatches * schedule.n_stages * (F + B))
    assert all(bubble >= -1e-9 for bubble in result.bubble)
    assert len(result.records) == sum(len(actions) for actions in schedule.actions)
    for rank, actions in enumerate(schedule.actions):
        records = [r for r in result.records if r.rank == rank]
        assert [r.action for r in records] == list(actions)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(records, records[1:], strict=False))
        assert all(
            r.end - r.start == pytest.approx(costs.of(r.action.op))
            for r in records
            if not r.action.op.is_comm
        )


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_simulator_accepts_every_schedule_from_pp_2_to_16(name: str) -> None:
    for pp in range(2, 17, 2 if name == "dualpipe" else 1):
        n = max(2 * pp, dualpipe_min_microbatches(pp))
        result = simulate(make_schedule(name, pp, n), COSTS)
        assert result.makespan > 0


def test_latency_delays_each_hop() -> None:
    """pp=2, one micro-batch: F, hop, F, B, hop, B."""
    latency = 0.5
    result = simulate(make_schedule("1f1b", 2, 1), dataclasses.replace(COSTS, p2p_latency=latency))
    assert result.makespan == pytest.approx(2 * (F + B) + 2 * latency)


def test_costs_reject_a_weight_pass_longer_than_the_backward() -> None:
    with pytest.raises(ValueError, match=r"Costs.w=3 is part of the full backward b=2; use w <= b"):
        Costs(f=1, b=2, w=3)
    with pytest.raises(ValueError, match=r"Costs.f must be >= 0"):
        Costs(f=-1, b=2)


# -- lists that cannot run ------------------------------------------------------------------------


def _parse(text: str) -> tuple[Action, ...]:
    """Actions written as `PipelineSchedule.format` prints them, e.g. "F(0.0) SEND_ACT(0.0->1)"."""
    pattern = r"(\w+)\((\d+)\.(\d+)(?:\|(\d+)\.(\d+))?(?:(?:->|<-)(\d+))?\)"
    return tuple(
        Action(Op[op], int(mb), int(chunk), *(None if x == "" else int(x) for x in (mb2, chunk2, peer)))
        for op, mb, chunk, mb2, chunk2, peer in re.findall(pattern, text)
    )


def _hand(*ranks: str, n_microbatches: int = 1) -> PipelineSchedule:
    """One stage per rank, lists given as text."""
    pp = len(ranks)
    stage_map = tuple((rank,) for rank in range(pp))
    actions = tuple(_parse(text) for text in ranks)
    return PipelineSchedule(
        "hand", pp, n_microbatches, 1, pp, stage_map, (0,), (0,) * n_microbatches, actions
    )


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        ("BW(0.0) F(0.0)", r"rank 0, action #0 BW\(0.0\): backward of micro-batch 0 before its forward"),
        ("F(0.0) W(0.0) B(0.0)", r"#1 W\(0.0\): W without an earlier input-only B"),
        ("F(0.0) BW(0.0) W(0.0)", r"W without an earlier input-only B"),
        ("F(0.0) F(0.0) BW(0.0)", r"micro-batch 0 forwarded twice on stage 0"),
        ("F(0.0) BW(0.0) BW(0.0)", r"micro-batch 0 backwarded twice on stage 0"),
        ("F(0.0)", r"incomplete; backward of \(mb, stage\) \[\(0, 0\)\] never ran"),
        ("F(0.0) B(0.0)", r"incomplete; W of \(mb, stage\) \[\(0, 0\)\] never ran"),
        ("FB(0.0|0.0)", r"backward of micro-batch 0 before its forward"),
        ("F(0.1) BW(0.1)", r"no micro-batch 0 or chunk 1"),
    ],
)
def test_broken_dependencies_are_rejected(actions: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        simulate(_hand(actions), COSTS)


def test_a_two_rank_list_with_a_forgotten_send_is_rejected() -> None:
    schedule = _hand("F(0.0) RECV_GRAD(0.0<-1) BW(0.0)", "RECV_ACT(0.0<-0) F(0.0) BW(0.0) SEND_GRAD(0.0->0)")
    with pytest.raises(ScheduleError, match=r"deadlock; .*rank 1 waits at #0 RECV_ACT\(0.0<-0\)"):
        simulate(schedule, COSTS)


def test_receiving_before_anyone_sends_is_a_deadlock() -> None:
    schedule = _hand(
        "RECV_GRAD(0.0<-1) F(0.0) SEND_ACT(0.0->1) BW(0.0)",
        "RECV_ACT(0.0<-0) F(0.0) BW(0.0) SEND_GRAD(0.0->0)",
    )
    message = r"deadlock; rank 0 waits at #0 RECV_GRAD\(0.0<-1\); rank 1 waits at #0 RECV_ACT\(0.0<-0\)"
    with pytest.raises(ScheduleError, match=message):
        simulate(schedule, COSTS)


def test_receiving_out_of_the_senders_order_is_rejected() -> None:
    """NCCL would hand micro-batch 0's activation to the RECV meant for micro-batch 1."""
    schedule = make_schedule("gpipe", 2, 2)
    rank1 = list(schedule.actions[1])
    first, second = (i for i, a in enumerate(rank1) if a.op is Op.RECV_ACT)
    rank1[first], rank1[second] = rank1[second], rank1[first]
    broken = dataclasses.replace(schedule, actions=(schedule.actions[0], tuple(rank1)))
    with pytest.raises(ScheduleError, match=r"rank 0's next message to this rank carries \('act', 0, 1\)"):
        simulate(broken, COSTS)


def _sends_before_receiving() -> PipelineSchedule:
    """Rank 0 runs three forwards before its first backward; rank 1 splits its first backward. Fine
    when sends never block, but with blocking P2P rank 0 waits to send micro-batch 1 while rank 1
    waits to send the gradient of micro-batch 0, which rank 0 receives only after its next forward."""
    return _hand(
        "F(0.0) SEND_ACT(0.0->1) F(1.0) SEND_ACT(1.0->1) F(2.0) SEND_ACT(2.0->1) "
        "RECV_GRAD(0.0<-1) BW(0.0) RECV_GRAD(1.0<-1) BW(1.0) RECV_GRAD(2.0<-1) BW(2.0)",
        "RECV_ACT(0.0<-0) F(0.0) B(0.0) SEND_GRAD(0.0->0) W(0.0) RECV_ACT(1.0<-0) F(1.0) BW(1.0) "
        "SEND_GRAD(1.0->0) RECV_ACT(2.0<-0) F(2.0) BW(2.0) SEND_GRAD(2.0->0)",
        n_microbatches=3,
    )


def test_lists_that_deadlock_with_blocking_p2p_are_rejected() -> None:
    message = r"deadlock with batched blocking P2P; rank 0 blocks at SEND_ACT\(1.0->1\) \(before F\(2.0\)\)"
    with pytest.raises(ScheduleError, match=message):
        simulate(_sends_before_receiving(), COSTS)


def test_inserted_communication_does_not_deadlock_with_blocking_p2p() -> None:
    """Given the same compute lists, insert_communication has rank 1 receive micro-batch 1 before its
    W (as DeepSeek's DualPipe does in its step 3), which unblocks rank 0's send."""
    schedule = _sends_before_receiving()
    computes = tuple(tuple(schedule.compute_actions(rank)) for rank in range(schedule.pp))
    placed = insert_communication(dataclasses.replace(schedule, actions=computes))
    rank1 = [str(a) for a in placed.actions[1]]
    assert rank1.index("RECV_ACT(1.0<-0)") < rank1.index("W(0.0)")
    simulate(placed, COSTS)
