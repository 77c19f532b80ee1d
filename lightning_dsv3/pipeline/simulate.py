"""Discrete-event simulation of pipeline schedules: makespan, bubbles and activation memory per rank.

Timing model. Each rank runs its list in order from time 0. A compute action starts when the rank is
free (its inputs are there by then: a remote input was waited for by its RECV, a local one was made
by an earlier action of the rank) and lasts its cost (`Costs`). A SEND takes no time and never
blocks; a RECV ends at max(rank free, matching SEND's time + latency), so the rank idles while it
waits. Costs are in any one time unit; `simulate(..., action_cost=...)` times each compute action by
its own cost instead (stages of unequal cost, or the measured durations of a run).
`SimResult.records` holds every action's start and end (a SEND is a point, a RECV spans its wait)
for Gantt charts.

Bubble. `SimResult.bubble[rank]` = makespan - busy time of the rank, where the makespan is the end of
the last action of any rank and busy time sums the rank's compute costs. PP below is the number of
stages (pp for DualPipe, 2 pp for DualPipeV, as in DeepSeek's table), F, B, W, F&B the fields of
`Costs`. With fixed costs and latency 0 the published bubbles come out as follows (tests/pipeline):

- 1F1B: every rank's bubble is (PP-1)(F+B), for any micro-batch count.
- ZB1P (ZB-H1): every rank's bubble is (PP-1)(F+B-2W) for n_microbatches >= PP, when W <= F and
  2W <= B (fewer micro-batches, or longer W, leave the deferred W unable to fill the tail).
- DualPipe, DualPipeV: the largest per-rank bubble (`SimResult.max_bubble`) is
  (PP/2-1)(F&B + max(F, B-W) - 2W) for every supported micro-batch count, when 2W <= B and
  max(F, B) <= F&B <= F+B. That is the published (PP/2-1)(F&B+B-3W) whenever the input backward
  B-W takes at least as long as F (DeepSeek's figure draws them equal); a longer F puts forwards on
  the critical path instead. The ranks nearest the turn reach it (those at distance h >= PP/2-2
  from their end of the pipe: ranks PP/2-2 .. PP/2+1 of DualPipe, the last two of DualPipeV);
  ranks nearer the ends idle less.

Activations. `SimResult.peak_activations[rank]` counts the (mb, chunk) forwards whose input backward
(B, BW, or the backward half of FB) has not finished, in units of one chunk's activations for one
micro-batch, sampled after each action's forward part is counted and before its backward part
frees: during an FB the new forward's and the old backward's activations are both held. That gives
the published peaks: PP on rank 0 for 1F1B and ZB1P (n_microbatches >= PP), PP+1 on every rank for
DualPipe and DualPipeV once n_microbatches >= 2 pp (the count DeepSeek's code requires). A B whose
W is pending counts as freed: what W keeps (layer inputs, output gradients) is a fraction of it.

Validation. `simulate` raises `ScheduleError` naming the rank and action for: a broken dependency
(backward before forward on a stage, a W without its input-only B, a micro-batch forwarded or
backwarded twice on a stage, a micro-batch on a chunk off its direction's path, a SEND of an output
not made, an input used before it arrived), a RECV whose payload differs from the one its rank pair
delivers next, a deadlock under the timing model (listing every stuck rank and action), a deadlock
under the runtime's batched blocking P2P (`check_batched_p2p`), and work or messages left at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_dsv3.pipeline.schedules import (
    Action,
    Op,
    PipelineSchedule,
    ScheduleError,
    check_batched_p2p,
)


@dataclass(frozen=True)
class Costs:
    """Duration of each action kind, in one time unit.

    `b` is the FULL backward (inputs and weights); `w` its weight part, so the input-only B costs
    b - w. `fb` is an overlapped forward and full backward of two micro-batches (default f + b).
    `p2p_latency` is added between a SEND and its RECV.
    """

    f: float
    b: float
    w: float = 0.0
    fb: float | None = None
    p2p_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "p2p_latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name} must be >= 0; got {getattr(self, name)}")
        if self.w > self.b:
            raise ValueError(f"Costs.w={self.w} is part of the full backward b={self.b}; use w <= b")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"Costs.fb must be >= 0 (or None for f + b); got {self.fb}")

    def of(self, op: Op) -> float:
        """Duration of one compute action of kind `op` (communication takes no compute time)."""
        return {
            Op.F: self.f,
            Op.B: self.b - self.w,
            Op.W: self.w,
            Op.BW: self.b,
            Op.FB: self.f + self.b if self.fb is None else self.fb,
        }.get(op, 0.0)


@dataclass(frozen=True)
class ActionRecord:
    """When one action ran, for Gantt charts: `index` is its position in `schedule.actions[rank]`."""

    rank: int
    index: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """Outcome of `simulate`; times in the unit of `Costs`, tuples indexed by rank."""

    makespan: float
    busy: tuple[float, ...]
    bubble: tuple[float, ...]
    peak_activations: tuple[int, ...]
    records: tuple[ActionRecord, ...]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)


ActionCost = Callable[[int, Action], float]  # (rank, compute action) -> its duration
_Payload = tuple[str, int, int]  # ("act" | "grad", mb, stage that consumes it)


class _Replay:
    """Runs every rank's list under the timing model, checking each dependency as it goes."""

    def __init__(self, schedule: PipelineSchedule, costs: Costs, action_cost: ActionCost | None) -> None:
        self.s = schedule
        self.costs = costs
        self.action_cost = action_cost
        pp = schedule.pp
        self.pos = [0] * pp
        self.clock = [0.0] * pp
        self.busy = [0.0] * pp
        self.live = [0] * pp  # activations held now
        self.peak = [0] * pp
        self.inbox: list[set[_Payload]] = [set() for _ in range(pp)]  # inputs that are here, unused
        self.outbox: list[set[_Payload]] = [set() for _ in range(pp)]  # produced, to be sent
        self.channels: dict[tuple[int, int], list[tuple[_Payload, float]]] = {}  # (src, dst) -> sent
        self.received: dict[tuple[int, int], int] = {}  # (src, dst) -> number received
        self.forwarded: set[tuple[int, int]] = set()  # (mb, stage)
        self.backwarded: set[tuple[int, int]] = set()
        self.w_pending: set[tuple[int, int]] = set()
        self.records: list[ActionRecord] = []

    def fail(self, rank: int, action: Action, why: str) -> ScheduleError:
        return ScheduleError(f"{self.s.name}: rank {rank}, action #{self.pos[rank]} {action}: {why}")

    # -- dependencies of compute parts

    def _stage(self, rank: int, action: Action, mb: int, chunk: int) -> int:
        if not 0 <= mb < self.s.n_microbatches or not 0 <= chunk < self.s.n_chunks:
            raise self.fail(rank, action, f"no micro-batch {mb} or chunk {chunk}")
        stage = self.s.stage_of(rank, chunk)
        if self.s.locate(mb, stage) != (rank, chunk):
            raise self.fail(rank, action, f"micro-batch {mb} does not pass through chunk {chunk} here")
        return stage

    def _take_input(self, rank: int, action: Action, payload: _Payload, what: str) -> None:
        if payload not in self.inbox[rank]:
            raise self.fail(rank, action, f"{what} of micro-batch {payload[1]} is not here yet")
        self.inbox[rank].remove(payload)

    def _give_output(self, rank: int, mb: int, stage: int, kind: str) -> None:
        """Output of (mb) for `stage`: handed over in memory on this rank, else waiting for its SEND."""
        if not 0 <= stage < self.s.n_stages:
            return  # past the last stage (the loss) or before the first (the data)
        if self.s.locate(mb, stage)[0] == rank:
            self.inbox[rank].add((kind, mb, stage))
        else:
            self.outbox[rank].add((kind, mb, stage))

    def _check_forward(self, rank: int, action: Action, mb: int, chunk: int) -> tuple[int, int]:
        stage = self._stage(rank, action, mb, chunk)
        if (mb, stage) in self.forwarded:
            raise self.fail(rank, action, f"micro-batch {mb} forwarded twice on stage {stage}")
        if stage > 0:
            self._take_input(rank, action, ("act", mb, stage), "the input activation")
        return mb, stage

    def _check_backward(self, rank: int, action: Action, mb: int, chunk: int) -> tuple[int, int]:
        stage = self._stage(rank, action, mb, chunk)
        if (mb, stage) not in self.forwarded:
            raise self.fail(rank, action, f"backward of micro-batch {mb} before its forward on stage {stage}")
        if (mb, stage) in self.backwarded:
            raise self.fail(rank, action, f"micro-batch {mb} backwarded twice on stage {stage}")
        if stage < self.s.n_stages - 1:
            self._take_input(rank, action, ("grad", mb, stage), "the output gradient")
        return mb, stage

    def _compute(self, rank: int, action: Action) -> None:
        # check both parts before any effect: an FB's backward must not lean on its own forward
        fwd = self._check_forward(rank, action, *action.forward_part) if action.forward_part else None
        bwd = self._check_backward(rank, action, *action.backward_part) if action.backward_part else None
        if action.op is Op.W:
            key = (action.mb, self._stage(rank, action, action.mb, action.chunk))
            if key not in self.w_pending:
                raise self.fail(rank, action, "W without an earlier input-only B of the same micro-batch")
            self.w_pending.remove(key)
        if fwd:
            self.forwarded.add(fwd)
            self.live[rank] += 1
            self._give_output(rank, fwd[0], fwd[1] + 1, "act")
        self.peak[rank] = max(self.peak[rank], self.live[rank])
        if bwd:
            self.backwarded.add(bwd)
            self.live[rank] -= 1
            if action.op is Op.B:
                self.w_pending.add(bwd)
            self._give_output(rank, bwd[0], bwd[1] - 1, "grad")
        cost = self.costs.of(action.op) if self.action_cost is None else self.action_cost(rank, action)
        self.busy[rank] += cost
        self._finish(rank, action, self.clock[rank], self.clock[rank] + cost)

    # -- communication

    def _payload(self, rank: int, action: Action) -> tuple[_Payload, int]:
        """(payload, rank at the other end that the payload's stage map asks for) of a SEND/RECV."""
        stage = self._stage(rank, action, action.mb, action.chunk)
        kind = "act" if action.op in (Op.SEND_ACT, Op.RECV_ACT) else "grad"
        step = {Op.SEND_ACT: 1, Op.RECV_ACT: 0, Op.SEND_GRAD: -1, Op.RECV_GRAD: 0}[action.op]
        payload = (kind, action.mb, stage + step)
        neighbour = stage + {Op.SEND_ACT: 1, Op.RECV_ACT: -1, Op.SEND_GRAD: -1, Op.RECV_GRAD: 1}[action.op]
        if not 0 <= neighbour < self.s.n_stages:
            raise self.fail(rank, action, f"stage {stage} has no neighbour stage {neighbour}")
        return payload, self.s.locate(action.mb, neighbour)[0]

    def _send(self, rank: int, action: Action) -> None:
        payload, peer = self._payload(rank, action)
        if peer != action.peer:
            raise self.fail(rank, action, f"the payload goes to rank {peer}, not {action.peer}")
        if payload not in self.outbox[rank]:
            raise self.fail(rank, action, "sends an output that was not produced here (or already sent)")
        self.outbox[rank].remove(payload)
        self.channels.setdefault((rank, peer), []).append((payload, self.clock[rank]))
        self._finish(rank, action, self.clock[rank], self.clock[rank])

    def _recv(self, rank: int, action: Action) -> bool:
        payload, peer = self._payload(rank, action)
        if peer != action.peer:
            raise self.fail(rank, action, f"the payload comes from rank {peer}, not {action.peer}")
        channel = (peer, rank)
        sent = self.channels.get(channel, [])
        k = self.received.get(channel, 0)
        if k == len(sent):
            return False  # the matching SEND has not run yet
        delivered, sent_at = sent[k]
        if delivered != payload:
            raise self.fail(rank, action, f"rank {peer}'s next message to this rank carries {delivered}")
        self.received[channel] = k + 1
        start = self.clock[rank]
        self.inbox[rank].add(payload)
        self._finish(rank, action, start, max(start, sent_at + self.costs.p2p_latency))
        return True

    def _finish(self, rank: int, action: Action, start: float, end: float) -> None:
        self.records.append(ActionRecord(rank, self.pos[rank], action, start, end))
        self.clock[rank] = end
        self.pos[rank] += 1

    # -- driver

    def step(self, rank: int) -> bool:
        """Run the next action of `rank`; False if it waits for a SEND that has not happened."""
        action = self.s.actions[rank][self.pos[rank]]
        if action.op in (Op.RECV_ACT, Op.RECV_GRAD):
            return self._recv(rank, action)
        if action.op in (Op.SEND_ACT, Op.SEND_GRAD):
            self._send(rank, action)
        else:
            self._compute(rank, action)
        return True

    def run(self) -> SimResult:
        lengths = [len(actions) for actions in self.s.actions]
        while any(p < n for p, n in zip(self.pos, lengths, strict=True)):
            progressed = False
            for rank in range(self.s.pp):
                while self.pos[rank] < lengths[rank] and self.step(rank):
                    progressed = True
            if not progressed:
                raise ScheduleError(f"{self.s.name}: deadlock; {self._stuck()}")
        self._check_complete()
        makespan = max(self.clock)
        return SimResult(
            makespan=makespan,
            busy=tuple(self.busy),
            bubble=tuple(makespan - b for b in self.busy),
            peak_activations=tuple(self.peak),
            records=tuple(sorted(self.records, key=lambda r: (r.rank, r.index))),
        )

    def _stuck(self) -> str:
        waits = [
            f"rank {rank} waits at #{self.pos[rank]} {self.s.actions[rank][self.pos[rank]]}"
            for rank in range(self.s.pp)
            if self.pos[rank] < len(self.s.actions[rank])
        ]
        return "; ".join(waits)

    def _check_complete(self) -> None:
        s = self.s
        expected = {(mb, stage) for mb in range(s.n_microbatches) for stage in range(s.n_stages)}
        problems = [
            f"{what} of (mb, stage) {sorted(expected - done)[:4]} never ran"
            for what, done in (("forward", self.forwarded), ("backward", self.backwarded))
            if expected - done
        ]
        if self.w_pending:
            problems.append(f"W of (mb, stage) {sorted(self.w_pending)[:4]} never ran")
        for rank in range(s.pp):
            if self.outbox[rank]:
                problems.append(f"rank {rank} never sent {sorted(self.outbox[rank])[:4]}")
            if self.inbox[rank]:
                problems.append(f"rank {rank} never used {sorted(self.inbox[rank])[:4]}")
        for (src, dst), sent in self.channels.items():
            if self.received.get((src, dst), 0) < len(sent):
                problems.append(
                    f"rank {dst} never received {sent[self.received.get((src, dst), 0)][0]} from {src}"
                )
        if problems:
            raise ScheduleError(f"{s.name}: incomplete; " + "; ".join(problems))


def simulate(schedule: PipelineSchedule, costs: Costs, action_cost: ActionCost | None = None) -> SimResult:
    """Time `schedule` under `costs`, after checking it can run (see the module docstring).

    `action_cost(rank, action)`, where given, is the duration of each compute action in place of
    `costs.of(action.op)` (`costs` still gives the P2P latency): one median per kind cannot describe
    stages that do unequal work, such as DualPipeV's V with the embedding and head on one rank.
    """
    result = _Replay(schedule, costs, action_cost).run()
    check_batched_p2p(schedule)
    return result
