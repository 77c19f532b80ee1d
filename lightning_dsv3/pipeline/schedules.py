"""Pipeline schedules as data: for each pipeline rank, the ordered list of actions it runs.

Generators (`make_schedule(name, pp, n_microbatches, **kw)` picks one by name; `pp` is always the
number of pipeline ranks): `gpipe`, `one_f_one_b` ("1f1b"), `interleaved_1f1b` (`n_chunks` per rank,
n_microbatches a multiple of pp), `zb1p` (ZB-H1), `dualpipe` (even pp, even n_microbatches >= 2(pp-1))
and `dualpipev` (2 pp stages, n_microbatches >= 2pp-1). Each lists compute actions only, phase by
phase; `insert_communication` then adds the SEND/RECV actions. `simulate.simulate` times a schedule.

A *chunk* is a piece of the model held by one rank (`chunk` indexes the pieces of that rank); a
*stage* is a piece's position in the model. `PipelineSchedule.stage_map[rank][chunk]` gives the
stage. Micro-batches flow in a *direction*: every micro-batch visits stages 0, 1, ..., n_stages - 1
forwards and the same stages in reverse backwards, at the (rank, chunk) that holds that stage for its
direction (`PipelineSchedule.locate`). Only DualPipe has two directions: its chunk 0 on rank r is
stage r of the direction fed from rank 0, its chunk 1 is stage PP-1-r of the direction fed from rank
PP-1, and the two copies of a stage share parameters (the runtime sums their gradients).

Compute actions (`Action.mb`, `Action.chunk` name a local chunk and a micro-batch):

- ``F``: forward. Input: the stage's input (data at stage 0, else the previous stage's output).
- ``B``: backward for the inputs only; keeps what its ``W`` needs. Input: the gradient of the stage's
  output (the loss at the last stage). Output: the gradient of the stage's input.
- ``W``: backward for the weights of an earlier ``B`` of the same (mb, chunk).
- ``BW``: full backward, ``B`` then ``W`` fused.
- ``FB``: forward of (mb, chunk) overlapped with the *full* backward of (mb2, chunk2), as DeepSeek's
  overlapped forward-backward; it needs both inputs before it starts and yields both outputs at its end.

Communication actions, inserted by `insert_communication` from the stage map (generators list only
compute actions); `peer` is the other rank, (mb, chunk) always the *local* chunk:

- ``SEND_ACT``: send the output of the forward of (mb, chunk) to the rank of the next stage.
- ``RECV_ACT``: receive the input of the forward of (mb, chunk) from the rank of the previous stage.
- ``SEND_GRAD``: send the input gradient of the backward of (mb, chunk) to the previous stage's rank.
- ``RECV_GRAD``: receive the output gradient for the backward of (mb, chunk) from the next stage's rank.

Where the neighbouring stage lives on the same rank (DualPipeV's turn: stages N-1 and N on rank N-1)
no action is inserted: the runtime hands the tensor from one chunk to the other in memory.

Runtime contract (the assumption the lists are built for; `check_batched_p2p` verifies it):

1. Each rank runs its list in order. A *group* is a maximal run of consecutive SEND/RECV actions
   (the sends that follow one compute action and the receives that precede the next). The runtime
   posts a whole group as one ``torch.distributed.batch_isend_irecv`` and waits for all of its
   requests before the next compute action starts.
2. Messages between an ordered pair of ranks are matched in the order they are posted (NCCL's rule;
   tags are ignored): the k-th SEND from rank a to rank b and the k-th RECV on b from a always name
   the same payload. To keep that order, and to break deadlocks (3.), a RECV may come earlier than
   the action that consumes it; the runtime keeps received tensors keyed by (kind, mb, chunk) until
   used. A SEND always sits in the group right after the action that made its payload.
3. No deadlock under rendezvous semantics, the strictest model of blocking P2P: an operation of a
   group completes only once its counterpart on the peer has been posted, so a SEND may block until
   its receiver reaches the matching group. Lists that pass also run when sends are buffered.
4. ``W`` names its (mb, chunk); generators emit them in first-in-first-out order of their ``B``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property


class Op(enum.Enum):
    """Kinds of action; see the module docstring for their inputs and outputs."""

    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"

    @property
    def is_comm(self) -> bool:
        return self in _COMM_OPS


_COMM_OPS = frozenset({Op.SEND_ACT, Op.RECV_ACT, Op.SEND_GRAD, Op.RECV_GRAD})


@dataclass(frozen=True)
class Action:
    """One step of a rank's list.

    For ``FB`` the forward part is (mb, chunk) and the backward part (mb2, chunk2); communication
    actions carry the `peer` rank; other actions use neither.
    """

    op: Op
    mb: int
    chunk: int
    mb2: int | None = None
    chunk2: int | None = None
    peer: int | None = None

    def __post_init__(self) -> None:
        has_second = self.mb2 is not None and self.chunk2 is not None
        if has_second != (self.op is Op.FB):
            raise ValueError(
                f"{self.op.name} takes mb2/chunk2 only for FB; got mb2={self.mb2}, chunk2={self.chunk2}"
            )
        if (self.peer is not None) != self.op.is_comm:
            raise ValueError(f"{self.op.name} takes a peer only for SEND/RECV actions; got peer={self.peer}")

    @property
    def forward_part(self) -> tuple[int, int] | None:
        """(mb, chunk) whose forward this action runs, if any."""
        return (self.mb, self.chunk) if self.op in (Op.F, Op.FB) else None

    @property
    def backward_part(self) -> tuple[int, int] | None:
        """(mb, chunk) whose input gradient this action computes, if any (B, BW, FB)."""
        if self.op is Op.FB:
            assert self.mb2 is not None and self.chunk2 is not None
            return self.mb2, self.chunk2
        return (self.mb, self.chunk) if self.op in (Op.B, Op.BW) else None

    def __str__(self) -> str:
        if self.op is Op.FB:
            return f"FB({self.mb}.{self.chunk}|{self.mb2}.{self.chunk2})"
        if self.op.is_comm:
            arrow = "->" if self.op.name.startswith("SEND") else "<-"
            return f"{self.op.name}({self.mb}.{self.chunk}{arrow}{self.peer})"
        return f"{self.op.name}({self.mb}.{self.chunk})"


@dataclass(frozen=True)
class PipelineSchedule:
    """Per-rank action lists and the layout they run on.

    `stage_map[rank][chunk]` is the stage of a chunk; `chunk_directions[chunk]` the direction chunk
    index `chunk` serves on every rank; `mb_directions[mb]` the direction of micro-batch `mb`;
    `actions[rank]` the ordered list of that rank.
    """

    name: str
    pp: int
    n_microbatches: int
    n_chunks: int
    n_stages: int
    stage_map: tuple[tuple[int, ...], ...]
    chunk_directions: tuple[int, ...]
    mb_directions: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if len(self.stage_map) != self.pp or any(len(chunks) != self.n_chunks for chunks in self.stage_map):
            raise ValueError(f"stage_map must be pp={self.pp} rows of n_chunks={self.n_chunks} stages")
        if len(self.chunk_directions) != self.n_chunks or len(self.mb_directions) != self.n_microbatches:
            raise ValueError(
                "chunk_directions needs one entry per chunk and mb_directions one per micro-batch"
            )
        if len(self.actions) != self.pp:
            raise ValueError(f"actions must hold one list per rank (pp={self.pp}), got {len(self.actions)}")
        placed = [(self.chunk_directions[c], s) for row in self.stage_map for c, s in enumerate(row)]
        for direction in sorted(set(self.mb_directions)):
            stages = sorted(s for d, s in placed if d == direction)
            if stages != list(range(self.n_stages)):
                raise ValueError(
                    f"direction {direction} must place each of the {self.n_stages} stages on exactly one "
                    f"(rank, chunk); stage_map gives {stages}"
                )

    @cached_property
    def _location(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(direction, stage) -> (rank, chunk), built once."""
        return {
            (self.chunk_directions[chunk], stage): (rank, chunk)
            for rank, row in enumerate(self.stage_map)
            for chunk, stage in enumerate(row)
        }

    def stage_of(self, rank: int, chunk: int) -> int:
        """Position in the model of `chunk` on `rank`."""
        return self.stage_map[rank][chunk]

    def locate(self, mb: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs `stage` for micro-batch `mb` (depends on the micro-batch's direction)."""
        return self._location[(self.mb_directions[mb], stage)]

    def compute_actions(self, rank: int) -> list[Action]:
        """The list of `rank` without its communication actions."""
        return [a for a in self.actions[rank] if not a.op.is_comm]

    def format(self, with_comm: bool = False) -> str:
        """One line per rank, for reading a schedule in a terminal or an error message."""
        lines = []
        for rank, actions in enumerate(self.actions):
            shown = actions if with_comm else self.compute_actions(rank)
            lines.append(f"rank {rank}: " + " ".join(str(a) for a in shown))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- communication pass

_Payload = tuple[str, int, int]  # ("act" | "grad", mb, stage that consumes it)
_End = tuple[int, int, int, bool]  # (src rank, dst rank, k-th message from src to dst, is the SEND end)


class ScheduleError(ValueError):
    """A list that cannot run: broken dependency, mismatched P2P order, deadlock, or missing work."""


def _outputs(schedule: PipelineSchedule, rank: int, action: Action) -> list[tuple[Action, _Payload]]:
    """SENDs needed after `action`: its outputs whose consuming stage lives on another rank."""
    sends: list[tuple[Action, _Payload]] = []
    for part, kind, step, op in (
        (action.forward_part, "act", 1, Op.SEND_ACT),
        (action.backward_part, "grad", -1, Op.SEND_GRAD),
    ):
        if part is None:
            continue
        mb, chunk = part
        stage = schedule.stage_of(rank, chunk) + step
        if 0 <= stage < schedule.n_stages:
            peer, _ = schedule.locate(mb, stage)
            if peer != rank:
                sends.append((Action(op, mb, chunk, peer=peer), (kind, mb, stage)))
    return sends


def _inputs(schedule: PipelineSchedule, rank: int, action: Action) -> list[tuple[int, _Payload]]:
    """(source rank, payload) that `action` needs from other ranks."""
    needs: list[tuple[int, _Payload]] = []
    for part, kind, step in ((action.forward_part, "act", -1), (action.backward_part, "grad", 1)):
        if part is None:
            continue
        mb, chunk = part
        stage = schedule.stage_of(rank, chunk)
        if 0 <= stage + step < schedule.n_stages:
            source, _ = schedule.locate(mb, stage + step)
            if source != rank:
                needs.append((source, (kind, mb, stage)))
    return needs


@dataclass
class _Batches:
    """One rank's list as compute actions with a P2P batch before each of them and one at the end."""

    computes: list[Action]
    batches: list[list[tuple[Action, _End]]]  # len(computes) + 1

    def flatten(self) -> tuple[Action, ...]:
        out = [a for a, _ in self.batches[0]]
        for compute, batch in zip(self.computes, self.batches[1:], strict=True):
            out += [compute, *(a for a, _ in batch)]
        return tuple(out)


class _Rendezvous:
    """Steps ranks through their P2P batches under rendezvous semantics (module docstring, point 3).

    A rank posts a batch when it reaches it and passes it once every operation in it has its
    counterpart posted; compute actions always finish.
    """

    def __init__(self, ranks: list[_Batches]) -> None:
        self.ranks = ranks
        self.at = [0] * len(ranks)  # the batch each rank is in; len(batches) once done
        self.posted: set[_End] = set()

    def unmatched(self, rank: int) -> list[_End]:
        return [
            (src, dst, k, is_send)
            for _, (src, dst, k, is_send) in self.ranks[rank].batches[self.at[rank]]
            if (src, dst, k, not is_send) not in self.posted
        ]

    def run(self) -> list[int]:
        """Advance every rank as far as it can; return the ranks left blocked."""
        progressed = True
        while progressed:
            progressed = False
            for rank, r in enumerate(self.ranks):
                while self.at[rank] < len(r.batches):
                    self.posted.update(end for _, end in r.batches[self.at[rank]])
                    if self.unmatched(rank):
                        break
                    self.at[rank] += 1
                    progressed = True
        return [rank for rank, r in enumerate(self.ranks) if self.at[rank] < len(r.batches)]

    def sends_on_cycles(self, stuck: list[int]) -> list[_End]:
        """Blocked SENDs whose wait closes a cycle of waiting ranks, lowest rank first."""
        waits = {
            rank: {dst if is_send else src for src, dst, _, is_send in self.unmatched(rank)} for rank in stuck
        }

        def reaches(start: int, goal: int) -> bool:
            seen, todo = {start}, [start]
            while todo:
                for peer in waits.get(todo.pop(), ()):
                    if peer == goal:
                        return True
                    if peer not in seen:
                        seen.add(peer)
                        todo.append(peer)
            return False

        return [end for rank in stuck for end in self.unmatched(rank) if end[3] and reaches(end[1], rank)]

    def prefetch_recv(self, send: _End) -> None:
        """Pull the RECV matching a blocked SEND, and the earlier RECVs of that rank pair, into the
        receiver's current batch (keeping their order)."""
        src, dst, k, _ = send
        r, here = self.ranks[dst], self.at[dst]
        pulled: list[tuple[Action, _End]] = []
        for i in range(here + 1, len(r.batches)):
            stays = []
            for item in r.batches[i]:
                e = item[1]
                (pulled if e[:2] == (src, dst) and not e[3] and e[2] <= k else stays).append(item)
            r.batches[i] = stays
        r.batches[here] += pulled
        self.posted.update(e for _, e in pulled)

    def describe(self, stuck: list[int]) -> str:
        waits = []
        for rank in stuck:
            src, dst, k, is_send = self.unmatched(rank)[0]
            action = next(
                a for a, e in self.ranks[rank].batches[self.at[rank]] if e == (src, dst, k, is_send)
            )
            peer, role = (dst, "receive") if is_send else (src, "send")
            computes = self.ranks[rank].computes
            before = computes[self.at[rank]] if self.at[rank] < len(computes) else "the end"
            waits.append(
                f"rank {rank} blocks at {action} (before {before}) until rank {peer} posts the matching "
                f"{role} (message #{k} from rank {src} to rank {dst})"
            )
        return "; ".join(waits)


def insert_communication(schedule: PipelineSchedule) -> PipelineSchedule:
    """Add SEND/RECV actions to compute-only lists so that they match per rank pair and cannot deadlock.

    Each SEND goes right after the action that produced its payload. Each RECV goes before the
    action that consumes it, and a rank receives from a peer in exactly the order that peer sends
    (NCCL matches a rank pair's messages in order), so a RECV may come earlier than its consumer.
    Then the ranks are stepped under rendezvous semantics; while they deadlock, the lowest rank on a
    cycle of waiting ranks that is blocked on a SEND has its receiver post the matching RECV at once,
    in the batch where that receiver waits. That is the move DeepSeek's DualPipe makes by hand (it
    receives the next forward's input before the W of its step 3), and it keeps the published bubbles.
    """
    ranks: list[_Batches] = []
    sent: dict[tuple[int, int], list[_Payload]] = {}  # (src, dst) -> payloads in send order
    for rank, actions in enumerate(schedule.actions):
        if any(a.op.is_comm for a in actions):
            raise ValueError(f"insert_communication takes compute-only lists; rank {rank} has P2P actions")
        ranks.append(_Batches(list(actions), [[] for _ in range(len(actions) + 1)]))
        for i, action in enumerate(actions):
            for send, payload in _outputs(schedule, rank, action):
                peer = send.peer
                assert peer is not None
                channel = sent.setdefault((rank, peer), [])
                ranks[rank].batches[i + 1].append((send, (rank, peer, len(channel), True)))
                channel.append(payload)
    position = {(channel, p): k for channel, payloads in sent.items() for k, p in enumerate(payloads)}
    for rank, r in enumerate(ranks):
        received: dict[tuple[int, int], int] = {}  # (src, dst) -> messages received so far
        for i, action in enumerate(r.computes):
            for source, payload in _inputs(schedule, rank, action):
                channel = (source, rank)
                last = position.get((channel, payload))
                if last is None:
                    raise ScheduleError(
                        f"{schedule.name}: rank {rank} runs {action}; rank {source} never sends {payload}"
                    )
                for k in range(received.get(channel, 0), last + 1):
                    kind, mb, stage = sent[channel][k]
                    recv = Action(
                        Op.RECV_ACT if kind == "act" else Op.RECV_GRAD,
                        mb,
                        schedule.locate(mb, stage)[1],
                        peer=source,
                    )
                    r.batches[i].append((recv, (source, rank, k, False)))
                received[channel] = max(received.get(channel, 0), last + 1)
    engine = _Rendezvous(ranks)
    while stuck := engine.run():
        repairable = engine.sends_on_cycles(stuck)
        if not repairable:
            raise ScheduleError(
                f"{schedule.name}: deadlock with batched blocking P2P; {engine.describe(stuck)}"
            )
        engine.prefetch_recv(repairable[0])
    return dataclasses.replace(schedule, actions=tuple(r.flatten() for r in ranks))


def check_batched_p2p(schedule: PipelineSchedule) -> None:
    """Raise `ScheduleError` if the lists deadlock with batched blocking P2P (module docstring, 1-3).

    Messages are numbered per rank pair in list order; assumes SEND and RECV counts per pair match
    (`simulate` checks that first).
    """
    ranks: list[_Batches] = []
    for rank, actions in enumerate(schedule.actions):
        r = _Batches([], [[]])
        counts: dict[tuple[int, int, bool], int] = {}  # (src, dst, is_send) -> messages so far
        for action in actions:
            if not action.op.is_comm:
                r.computes.append(action)
                r.batches.append([])
                continue
            assert action.peer is not None
            is_send = action.op in (Op.SEND_ACT, Op.SEND_GRAD)
            src, dst = (rank, action.peer) if is_send else (action.peer, rank)
            k = counts.get((src, dst, is_send), 0)
            counts[(src, dst, is_send)] = k + 1
            r.batches[-1].append((action, (src, dst, k, is_send)))
        ranks.append(r)
    engine = _Rendezvous(ranks)
    if stuck := engine.run():
        raise ScheduleError(f"{schedule.name}: deadlock with batched blocking P2P; {engine.describe(stuck)}")


# ----------------------------------------------------------------------------- generator helpers


class _Program:
    """Builds one rank's compute list; hands out micro-batches per chunk in order, W in FIFO order."""

    def __init__(self, mb_of: Callable[[int, int], int]) -> None:
        self.mb_of = mb_of  # (chunk, k) -> id of the k-th micro-batch that chunk processes
        self.actions: list[Action] = []
        self._next_f: dict[int, int] = {}
        self._next_b: dict[int, int] = {}
        self._w_queue: deque[tuple[int, int]] = deque()

    def _take(self, counters: dict[int, int], chunk: int) -> int:
        k = counters.get(chunk, 0)
        counters[chunk] = k + 1
        return self.mb_of(chunk, k)

    def f(self, chunk: int) -> None:
        self.actions.append(Action(Op.F, self._take(self._next_f, chunk), chunk))

    def b(self, chunk: int, split: bool = False) -> None:
        """Full backward, or with `split` the input part now and its W later (queued)."""
        mb = self._take(self._next_b, chunk)
        if split:
            self._w_queue.append((mb, chunk))
        self.actions.append(Action(Op.B if split else Op.BW, mb, chunk))

    def w(self) -> None:
        mb, chunk = self._w_queue.popleft()
        self.actions.append(Action(Op.W, mb, chunk))

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        f_mb = self._take(self._next_f, f_chunk)
        b_mb = self._take(self._next_b, b_chunk)
        self.actions.append(Action(Op.FB, f_mb, f_chunk, mb2=b_mb, chunk2=b_chunk))


def _finish(
    name: str,
    pp: int,
    n_microbatches: int,
    stage_map: Sequence[Sequence[int]],
    programs: Sequence[_Program],
    chunk_directions: Sequence[int] | None = None,
    mb_directions: Sequence[int] | None = None,
) -> PipelineSchedule:
    n_chunks = len(stage_map[0])
    directions = tuple(chunk_directions or (0,) * n_chunks)
    compute_only = PipelineSchedule(
        name=name,
        pp=pp,
        n_microbatches=n_microbatches,
        n_chunks=n_chunks,
        n_stages=1 + max(max(row) for row in stage_map),
        stage_map=tuple(tuple(row) for row in stage_map),
        chunk_directions=directions,
        mb_directions=tuple(mb_directions or (0,) * n_microbatches),
        actions=tuple(tuple(p.actions) for p in programs),
    )
    return insert_communication(compute_only)


def _check_sizes(name: str, pp: int, n_microbatches: int) -> None:
    if pp < 1:
        raise ValueError(f"{name} needs pp >= 1 pipeline ranks; got pp={pp}")
    if n_microbatches < 1:
        raise ValueError(f"{name} needs n_microbatches >= 1; got n_microbatches={n_microbatches}")


def _one_stage_per_rank(pp: int) -> list[list[int]]:
    return [[rank] for rank in range(pp)]


def _in_order(chunk: int, k: int) -> int:
    return k


# ----------------------------------------------------------------------------- generators


def gpipe(pp: int, n_microbatches: int) -> PipelineSchedule:
    """GPipe: every forward, then every full backward; holds all n_microbatches activations."""
    _check_sizes("gpipe", pp, n_microbatches)
    programs = []
    for _ in range(pp):
        p = _Program(_in_order)
        for _ in range(n_microbatches):  # forward all: n
            p.f(0)
        for _ in range(n_microbatches):  # backward all: n
            p.b(0)
        programs.append(p)
    return _finish("gpipe", pp, n_microbatches, _one_stage_per_rank(pp), programs)


def one_f_one_b(pp: int, n_microbatches: int) -> PipelineSchedule:
    """1F1B (PipeDream-flush): warm up, then alternate one forward and one full backward.

    Rank r holds at most min(pp - r, n) activations; bubble (pp-1)(F+B) per rank.
    """
    _check_sizes("1f1b", pp, n_microbatches)
    programs = []
    for rank in range(pp):
        p = _Program(_in_order)
        n_warmup = min(pp - 1 - rank, n_microbatches)
        for _ in range(n_warmup):  # warm-up: min(pp-1-r, n) F
            p.f(0)
        for _ in range(n_microbatches - n_warmup):  # steady: n - warmup x (F, BW)
            p.f(0)
            p.b(0)
        for _ in range(n_warmup):  # cool-down: warmup x BW
            p.b(0)
        programs.append(p)
    return _finish("1f1b", pp, n_microbatches, _one_stage_per_rank(pp), programs)


def zb1p(pp: int, n_microbatches: int) -> PipelineSchedule:
    """ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism): 1F1B whose rank r defers r weight passes.

    The input-only backward shortens the gradient's critical path; the r deferred W fill the tail.
    Activations held match 1F1B (a deferred W counts as freed, see `simulate`).
    """
    _check_sizes("zb1p", pp, n_microbatches)
    programs = []
    for rank in range(pp):
        p = _Program(_in_order)
        n_warmup = min(pp - 1 - rank, n_microbatches)
        n_deferred = min(rank, n_microbatches - n_warmup)
        for _ in range(n_warmup):  # warm-up: min(pp-1-r, n) F
            p.f(0)
        for _ in range(n_deferred):  # steady, W deferred: min(r, n - warmup) x (F, B)
            p.f(0)
            p.b(0, split=True)
        for _ in range(n_microbatches - n_warmup - n_deferred):  # steady: the rest x (F, B, W)
            p.f(0)
            p.b(0, split=True)
            p.w()
        for _ in range(n_warmup):  # cool-down: warmup x (B, W)
            p.b(0, split=True)
            p.w()
        for _ in range(n_deferred):  # drain the deferred W: min(r, n - warmup)
            p.w()
        programs.append(p)
    return _finish("zb1p", pp, n_microbatches, _one_stage_per_rank(pp), programs)


def interleaved_1f1b(pp: int, n_microbatches: int, n_chunks: int = 2) -> PipelineSchedule:
    """Megatron's interleaved 1F1B: `n_chunks` (V) chunks per rank, chunk c on rank r is stage c*pp + r.

    Micro-batches go in groups of pp: the k-th forward of a rank is micro-batch (k // (pp V)) pp + k % pp
    on chunk (k // pp) % V; backwards run the same order with chunks reversed. Bubble shrinks by V.
    """
    _check_sizes("interleaved_1f1b", pp, n_microbatches)
    if n_chunks < 2:
        raise ValueError(
            f"interleaved_1f1b needs n_chunks >= 2; got n_chunks={n_chunks}; use schedule='1f1b'"
        )
    if n_microbatches % pp:
        lower, upper = (n_microbatches // pp) * pp, (n_microbatches // pp + 1) * pp
        fix = f"n_microbatches={upper}" if lower == 0 else f"n_microbatches={lower} or {upper}"
        raise ValueError(
            f"interleaved_1f1b needs n_microbatches divisible by pp={pp}; "
            f"got n_microbatches={n_microbatches}; use {fix}, or schedule='1f1b'"
        )
    group = pp * n_chunks

    def forward_of(k: int) -> tuple[int, int]:
        return (k // group) * pp + k % pp, (k % group) // pp

    programs = []
    for rank in range(pp):
        p = _Program(_in_order)
        total = n_microbatches * n_chunks
        n_warmup = min(2 * (pp - 1 - rank) + (n_chunks - 1) * pp, total)
        forwards = [forward_of(k) for k in range(total)]
        backwards = [(mb, n_chunks - 1 - chunk) for mb, chunk in forwards]
        for mb, chunk in forwards[:n_warmup]:  # warm-up: min(2(pp-1-r) + (V-1)pp, nV) F
            p.actions.append(Action(Op.F, mb, chunk))
        steady = zip(forwards[n_warmup:], backwards[: total - n_warmup], strict=True)
        for (f_mb, f_chunk), (b_mb, b_chunk) in steady:  # steady: nV - warmup x (F, BW)
            p.actions += [Action(Op.F, f_mb, f_chunk), Action(Op.BW, b_mb, b_chunk)]
        for mb, chunk in backwards[total - n_warmup :]:  # cool-down: warmup x BW
            p.actions.append(Action(Op.BW, mb, chunk))
        programs.append(p)
    stage_map = [[chunk * pp + rank for chunk in range(n_chunks)] for rank in range(pp)]
    return _finish("interleaved_1f1b", pp, n_microbatches, stage_map, programs)


def _dual_program(
    n_half_ranks: int, half_rank: int, n_per_chunk: int, near: int, mb_of: Callable[[int, int], int]
) -> _Program:
    """The eight phases shared by DualPipe and DualPipeV for one rank.

    N = `n_half_ranks` ranks from an end of the pipe to the turn, h = `half_rank` the distance of this
    rank from its end, M = `n_per_chunk` micro-batches each chunk processes. The `near` chunk is the one
    fed from this rank's end of the pipe, `far` the one coming back. The rank at the turn (h = N-1)
    runs its first step-4 pair as a plain F and BW rather than overlapped, as DeepSeek's does.
    """
    far = 1 - near
    n, h, m = n_half_ranks, half_rank, n_per_chunk
    p = _Program(mb_of)
    for _ in range(2 * (n - h - 1)):  # 1. nF0: 2(N-h-1) forwards of the near chunk
        p.f(near)
    for _ in range(h + 1):  # 2. nF0F1: h+1 x (F near, F far)
        p.f(near)
        p.f(far)
    for _ in range(n - h - 1):  # 3. nB1W1F1: N-h-1 x (B far, W, F far), zero-bubble split
        p.b(far, split=True)
        p.w()
        p.f(far)
    for i in range(m - 2 * n + h + 1):  # 4. nF0B1F1B0 (main): M-2N+h+1 x (F near & B far, F far & B near)
        if i == 0 and h == n - 1:
            p.f(near)
            p.b(far)
        else:
            p.fb(near, far)
        p.fb(far, near)
    for _ in range(n - h - 1):  # 5. nB1F1B0: N-h-1 x (B far, F far & B near)
        p.b(far)
        p.fb(far, near)
    for i in range(h + 1):  # 6. nB1B0: h+1 x (B far, B near); the last h+1 of these 2(h+1) are split
        p.b(far, split=2 * i >= h + 1)
        p.b(near, split=2 * i + 1 >= h + 1)
    for _ in range(n - h - 1):  # 7. nWB0: N-h-1 x (W, B near split)
        p.w()
        p.b(near, split=True)
    for _ in range(h + 1):  # 8. nW: h+1 x W
        p.w()
    return p


def dualpipe_min_microbatches(pp: int) -> int:
    """Smallest micro-batch count DualPipe's phases support: 2(pp-1), so that phase 4 of rank 0 runs >= 0
    times (DeepSeek's code asserts the stricter n >= 2 pp)."""
    return max(2, 2 * (pp - 1))


def dualpipe(pp: int, n_microbatches: int) -> PipelineSchedule:
    """DualPipe (DeepSeek-V3): micro-batches 0..n/2-1 enter at rank 0, n/2..n-1 at rank pp-1.

    Chunk 0 of rank r is stage r of the first direction, chunk 1 stage pp-1-r of the second; both
    copies of a stage hold the same parameters. Rank r and rank pp-1-r run mirrored programs.
    """
    _check_sizes("dualpipe", pp, n_microbatches)
    if pp % 2:
        even = " or ".join(str(p) for p in (pp - 1, pp + 1) if p >= 2)
        raise ValueError(f"dualpipe needs an even pp; got pp={pp}; use pp={even}, or schedule='dualpipev'")
    least = dualpipe_min_microbatches(pp)
    if n_microbatches % 2 or n_microbatches < least:
        fix = max(least, n_microbatches + n_microbatches % 2)
        raise ValueError(
            f"dualpipe needs an even n_microbatches >= 2(pp-1) = {least} (half go each way); "
            f"got n_microbatches={n_microbatches}; use n_microbatches={fix}"
        )
    half = n_microbatches // 2

    def mb_of(chunk: int, k: int) -> int:
        return chunk * half + k

    programs = [
        _dual_program(pp // 2, min(rank, pp - 1 - rank), half, 0 if rank < pp // 2 else 1, mb_of)
        for rank in range(pp)
    ]
    stage_map = [[rank, pp - 1 - rank] for rank in range(pp)]
    return _finish("dualpipe", pp, n_microbatches, stage_map, programs, (0, 1), [0] * half + [1] * half)


def dualpipev_min_microbatches(pp: int) -> int:
    """Smallest micro-batch count DualPipeV's phases support: 2 pp - 1, so that phase 4 of rank 0 runs
    >= 0 times (DeepSeek's code asserts n >= 2 pp)."""
    return 2 * pp - 1


def dualpipev(pp: int, n_microbatches: int) -> PipelineSchedule:
    """DualPipeV ("cut-in-half" DualPipe): 2 pp distinct stages on pp ranks in a V.

    Rank r holds stage r (chunk 0) and stage 2pp-1-r (chunk 1); every micro-batch enters and ends at
    rank 0, and stages pp-1 and pp meet on rank pp-1 with no communication between them.
    """
    _check_sizes("dualpipev", pp, n_microbatches)
    least = dualpipev_min_microbatches(pp)
    if n_microbatches < least:
        raise ValueError(
            f"dualpipev needs n_microbatches >= 2pp-1 = {least}; got n_microbatches={n_microbatches}; "
            f"use n_microbatches={least} or more, or a smaller pp"
        )
    programs = [_dual_program(pp, rank, n_microbatches, 0, _in_order) for rank in range(pp)]
    stage_map = [[rank, 2 * pp - 1 - rank] for rank in range(pp)]
    return _finish("dualpipev", pp, n_microbatches, stage_map, programs)


GENERATORS: dict[str, Callable[..., PipelineSchedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def make_schedule(name: str, pp: int, n_microbatches: int, **kwargs: int) -> PipelineSchedule:
    """Build the schedule called `name` (a key of `GENERATORS`); `kwargs` go to its generator."""
    if name not in GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(GENERATORS)}")
    return GENERATORS[name](pp, n_microbatches, **kwargs)
