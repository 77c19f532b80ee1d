"""Schedule generators: structure of the lists, communication order, and the errors users see."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dsv3.pipeline import (
    GENERATORS,
    Action,
    Op,
    PipelineSchedule,
    dualpipe_min_microbatches,
    dualpipev_min_microbatches,
    make_schedule,
)


@st.composite
def requests(draw: st.DrawFn, names: tuple[str, ...] = tuple(GENERATORS)) -> tuple[str, int, int]:
    """A valid (schedule name, pp, n_microbatches) with pp in 2..16 and a modest micro-batch count."""
    name = draw(st.sampled_from(names))
    if name == "dualpipe":
        pp = 2 * draw(st.integers(1, 8))
        least = dualpipe_min_microbatches(pp)
        return name, pp, least + 2 * draw(st.integers(0, pp))
    pp = draw(st.integers(2, 16))
    if name == "dualpipev":
        return name, pp, draw(st.integers(dualpipev_min_microbatches(pp), 3 * pp))
    if name == "interleaved_1f1b":
        return name, pp, pp * draw(st.integers(1, 3))
    return name, pp, draw(st.integers(1, 2 * pp + 2))


def _stage_ops(schedule: PipelineSchedule) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(mb, stage) of every forward and every input backward, read off the lists."""
    forwards, backwards = [], []
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            if a.forward_part:
                forwards.append((a.forward_part[0], schedule.stage_of(rank, a.forward_part[1])))
            if a.backward_part:
                backwards.append((a.backward_part[0], schedule.stage_of(rank, a.backward_part[1])))
    return forwards, backwards


@settings(max_examples=60, deadline=None)
@given(requests())
def test_every_stage_runs_each_microbatch_once_forward_and_backward(request: tuple[str, int, int]) -> None:
    schedule = make_schedule(*request)
    forwards, backwards = _stage_ops(schedule)
    expected = sorted((mb, s) for mb in range(schedule.n_microbatches) for s in range(schedule.n_stages))
    assert sorted(forwards) == expected
    assert sorted(backwards) == expected


@settings(max_examples=40, deadline=None)
@given(requests())
def test_every_w_follows_its_input_backward_on_the_same_rank(request: tuple[str, int, int]) -> None:
    schedule = make_schedule(*request)
    for actions in schedule.actions:
        split = {(a.mb, a.chunk): i for i, a in enumerate(actions) if a.op is Op.B}
        weights = {(a.mb, a.chunk): i for i, a in enumerate(actions) if a.op is Op.W}
        assert split.keys() == weights.keys()
        assert all(split[key] < weights[key] for key in split)


def _payload(schedule: PipelineSchedule, rank: int, action: Action) -> tuple[str, int, int]:
    """("act" | "grad", mb, consuming stage) that a SEND or RECV carries."""
    stage = schedule.stage_of(rank, action.chunk)
    step = {Op.SEND_ACT: 1, Op.RECV_ACT: 0, Op.SEND_GRAD: -1, Op.RECV_GRAD: 0}[action.op]
    kind = "act" if action.op in (Op.SEND_ACT, Op.RECV_ACT) else "grad"
    return kind, action.mb, stage + step


@settings(max_examples=60, deadline=None)
@given(requests())
def test_sends_and_receives_match_in_order_per_rank_pair(request: tuple[str, int, int]) -> None:
    """NCCL matches a rank pair's messages in posting order: both ends must list the same payloads."""
    schedule = make_schedule(*request)
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    received: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            if a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                sent.setdefault((rank, a.peer), []).append(_payload(schedule, rank, a))
            elif a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                received.setdefault((a.peer, rank), []).append(_payload(schedule, rank, a))
            assert a.peer != rank, f"rank {rank} talks to itself: {a}"
    assert sent == received


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
def test_dualpipev_turn_stays_on_the_last_rank(pp: int) -> None:
    """Stages pp-1 and pp both live on rank pp-1: their hand-over is in memory, not a message."""
    schedule = make_schedule("dualpipev", pp, 2 * pp)
    last = pp - 1
    assert schedule.stage_map[last] == (pp - 1, pp)
    across_the_turn = {(Op.SEND_ACT, 0), (Op.RECV_ACT, 1), (Op.SEND_GRAD, 1), (Op.RECV_GRAD, 0)}
    assert not [a for a in schedule.actions[last] if (a.op, a.chunk) in across_the_turn]


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipe_sends_half_the_microbatches_each_way(pp: int) -> None:
    n = 2 * pp
    schedule = make_schedule("dualpipe", pp, n)
    assert schedule.n_stages == pp
    assert schedule.mb_directions == (0,) * pp + (1,) * pp
    for mb in range(n):
        entry, loss = schedule.locate(mb, 0), schedule.locate(mb, pp - 1)
        assert (entry, loss) == (((0, 0), (pp - 1, 0)) if mb < pp else ((pp - 1, 1), (0, 1)))
    # chunk 1 of rank r is the reverse-direction copy of stage pp-1-r
    assert all(schedule.stage_map[r] == (r, pp - 1 - r) for r in range(pp))


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_dualpipev_enters_and_ends_at_rank_zero(pp: int) -> None:
    schedule = make_schedule("dualpipev", pp, 2 * pp)
    assert schedule.n_stages == 2 * pp
    assert all(schedule.locate(mb, 0) == (0, 0) for mb in range(2 * pp))
    assert all(schedule.locate(mb, 2 * pp - 1) == (0, 1) for mb in range(2 * pp))


def test_dualpipe_phases_follow_deepseeks_counts() -> None:
    """Rank 0 of DualPipe with pp=4, n=12 (N=2, h=0, M=6): phases 1..8 give 2F, F F, B W F, 3 x (FB FB),
    BW FB, BW B, W B, W."""
    rank0 = [str(a) for a in make_schedule("dualpipe", 4, 12).compute_actions(0)]
    assert rank0 == [
        "F(0.0)", "F(1.0)",  # 1. 2(N-h-1) F near
        "F(2.0)", "F(6.1)",  # 2. h+1 x (F near, F far)
        "B(6.1)", "W(6.1)", "F(7.1)",  # 3. N-h-1 x (B far, W, F far)
        "FB(3.0|7.1)", "FB(8.1|0.0)", "FB(4.0|8.1)", "FB(9.1|1.0)", "FB(5.0|9.1)", "FB(10.1|2.0)",  # 4.
        "BW(10.1)", "FB(11.1|3.0)",  # 5. N-h-1 x (B far, F far & B near)
        "BW(11.1)", "B(4.0)",  # 6. h+1 x (B far, B near), the last h+1 split
        "W(4.0)", "B(5.0)",  # 7. N-h-1 x (W, B near split)
        "W(5.0)",  # 8. h+1 x W
    ]  # fmt: skip


def test_interleaved_forwards_go_in_groups_of_pp() -> None:
    schedule = make_schedule("interleaved_1f1b", 2, 4, n_chunks=3)
    assert schedule.stage_map == ((0, 2, 4), (1, 3, 5))
    forwards = [(a.mb, a.chunk) for a in schedule.compute_actions(0) if a.op is Op.F]
    assert forwards[:8] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0), (3, 0)]


def test_make_schedule_builds_every_name() -> None:
    for name in GENERATORS:
        schedule = make_schedule(name, 4, 8)
        assert (schedule.name, schedule.pp, schedule.n_microbatches) == (name, 4, 8)
        assert schedule.format().startswith("rank 0: ")


@pytest.mark.parametrize(
    ("name", "pp", "n", "kwargs", "message"),
    [
        ("dualpipe", 3, 8, {}, r"needs an even pp; got pp=3; use pp=2 or 4, or schedule='dualpipev'"),
        ("dualpipe", 1, 8, {}, r"use pp=2, or schedule='dualpipev'"),
        ("dualpipe", 4, 7, {}, r"= 6 \(half go each way\); got n_microbatches=7; use n_microbatches=8"),
        ("dualpipe", 8, 10, {}, r"got n_microbatches=10; use n_microbatches=14"),
        ("dualpipev", 4, 6, {}, r">= 2pp-1 = 7; got n_microbatches=6; use n_microbatches=7 or more"),
        ("interleaved_1f1b", 4, 6, {}, r"divisible by pp=4; got n_microbatches=6; use n_microbatches=4 or 8"),
        ("interleaved_1f1b", 4, 3, {}, r"use n_microbatches=4, or schedule='1f1b'"),
        ("interleaved_1f1b", 4, 8, {"n_chunks": 1}, r"n_chunks >= 2; got n_chunks=1; use schedule='1f1b'"),
        ("1f1b", 0, 8, {}, r"1f1b needs pp >= 1 pipeline ranks; got pp=0"),
        ("zb1p", 2, 0, {}, r"zb1p needs n_microbatches >= 1; got n_microbatches=0"),
        ("zero_bubble", 2, 4, {}, r"unknown schedule 'zero_bubble'; choose one of \['1f1b', 'dualpipe'"),
    ],
)  # fmt: skip
def test_invalid_requests_say_what_would_work(name: str, pp: int, n: int, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_schedule(name, pp, n, **kwargs)


def test_smallest_supported_microbatch_counts_build() -> None:
    """DeepSeek's code asserts n >= 2 pp; the phase formulas work down to 2(pp-1) and 2pp-1."""
    assert make_schedule("dualpipe", 8, 14).n_microbatches == 14
    assert make_schedule("dualpipev", 8, 15).n_microbatches == 15


def test_actions_reject_fields_of_other_kinds() -> None:
    with pytest.raises(ValueError, match="takes mb2/chunk2 only for FB"):
        Action(Op.FB, 0, 0)
    with pytest.raises(ValueError, match="takes a peer only for SEND/RECV"):
        Action(Op.F, 0, 0, peer=1)
    with pytest.raises(ValueError, match="takes a peer only for SEND/RECV"):
        Action(Op.SEND_ACT, 0, 0)


def test_schedule_rejects_a_stage_map_missing_a_stage() -> None:
    with pytest.raises(ValueError, match=r"direction 0 must place each of the 3 stages .* gives \[0, 2\]"):
        PipelineSchedule("broken", 2, 1, 1, 3, ((0,), (2,)), (0,), (0,), ((), ()))
