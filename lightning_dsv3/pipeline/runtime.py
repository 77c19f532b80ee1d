"""Execute one rank's pipeline action list: P2P transfers, F / B / W / BW and the overlapped FB.

The list comes from `schedules.py` with its SEND/RECV actions already placed; a run of consecutive
SEND/RECV actions is posted as one `batch_isend_irecv` and completed before the next compute action
(the contract in the schedules module docstring). Where two consecutive stages live on this rank
(DualPipeV's turn) the tensor is handed over in memory.

Two kinds of forward are recorded part by part (see `overlap.py`), so their backwards run part by
part too: in a chunk whose MoE layers exchange tokens (expert parallelism), one that an FB
interleaves (its own, or its micro-batch's backward), since the overlapped FB action interleaves one
micro-batch's forward with another's backward; and, in an eager chunk, one whose W runs apart from
its B (`part_wise_forwards` says why). Every other forward is recorded whole, one graph through the chunk
(`forward_parts(whole=True)`): the parts would only add host work, and without an all-to-all there
is nothing to overlap. Backward for inputs (B) and for weights (W) are split per recorded part (B
keeps the part's graph, W walks it again for the weights). A B followed at once by its own W (stage
0, whose input gradient nobody waits for) runs as one full backward and is recorded as BW: the split
would only walk the graphs twice. A compiled chunk's B runs whole too (its W is then empty): each
compiled part is one backward node that computes input and weight gradients together, so splitting
would run it twice.

Each compute action is recorded with its start and end (CUDA events on GPU, wall clock on CPU) for
the pipeline timeline.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lightning_dsv3.faults import collective
from lightning_dsv3.model.transformer import LossOutput, Transformer
from lightning_dsv3.pipeline.graphs import ChunkGraphs, graphs_ineligible, slots_needed
from lightning_dsv3.pipeline.overlap import (
    Chain,
    ParamCache,
    Streams,
    Tape,
    exchanges_tokens,
    forward_parts,
    lockstep,
)
from lightning_dsv3.pipeline.schedules import Action, Op, PipelineSchedule

LossFn = Callable[[Transformer, torch.Tensor, torch.Tensor], LossOutput]


@dataclass
class ActionTiming:
    """One executed compute action: what ran and when (seconds from the start of the step)."""

    action: str
    start_s: float
    end_s: float


class ActionClock:
    """Start and end marks of a step's compute actions: CUDA events on GPUs, read only when the timings
    are asked for (the step never waits for the device), the wall clock on CPU. Host times on a GPU
    would measure kernel launches, not the kernels."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._t0: Any = None
        self._marks: list[tuple[str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._marks = []
        self._t0 = self.mark()

    def add(self, action: str, start: Any, end: Any) -> None:
        self._marks.append((action, start, end))

    def read(self) -> list[ActionTiming]:
        """The actions in seconds from the start of the step (waits for the step's last action)."""
        if self.cuda:
            if self._marks:
                self._marks[-1][2].synchronize()
            return [
                ActionTiming(a, self._t0.elapsed_time(s) / 1e3, self._t0.elapsed_time(e) / 1e3)
                for a, s, e in self._marks
            ]
        return [ActionTiming(a, s - self._t0, e - self._t0) for a, s, e in self._marks]


@dataclass
class _State:
    """Tensors alive between the actions of one step, keyed by (micro-batch, local chunk)."""

    tapes: dict[tuple[int, int], Tape] = field(default_factory=dict)  # recorded forwards awaiting backward
    chains: dict[tuple[int, int], Chain] = field(default_factory=dict)  # each micro-batch's event chain
    sends: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # stage outputs to send
    acts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # received stage inputs
    grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # received output grads
    input_grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # to send back
    losses: list[tuple[int, LossOutput]] = field(default_factory=list)
    # (micro-batch, chunk)s recorded part by part (`part_wise_forwards`); every other forward is whole
    part_wise: set[tuple[int, int]] = field(default_factory=set)
    # the CUDA graph slot each graphed (micro-batch, chunk) holds from its forward to its backward
    slots: dict[tuple[int, int], int] = field(default_factory=dict)


class PipelineRuntime:
    """Runs `schedule`'s list for pipeline rank `pp_rank` over this rank's `chunks`.

    Args:
        schedule: the schedule (SEND/RECV included).
        chunks: local model chunks, indexed like the schedule's chunks.
        pp_rank: this rank's position in the pipeline group.
        group: the pipeline process group; `global_rank(pp_rank)` maps its members to global ranks.
        loss_fn: (last-stage chunk, hidden, tokens) -> LossOutput.
    """

    def __init__(
        self,
        schedule: PipelineSchedule,
        chunks: list[Transformer],
        pp_rank: int,
        group: dist.ProcessGroup | None,
        global_rank: Callable[[int], int],
        loss_fn: LossFn,
    ) -> None:
        if len(chunks) != schedule.n_chunks:
            raise ValueError(
                f"the schedule has {schedule.n_chunks} chunks per rank, got {len(chunks)} modules"
            )
        self.schedule = schedule
        self.chunks = chunks
        self.rank = pp_rank
        self.group = group
        self.global_rank = global_rank
        self._peer_ranks = [global_rank(r) for r in range(schedule.pp)]  # read per transfer: kept
        self.loss_fn = loss_fn
        self._part_params: ParamCache = {}
        # what decides part-wise recording, read once: the chunks come compiled and with their
        # dispatchers installed (the strategy builds the runtime after both)
        self._compiled = [c.parts_compiled for c in chunks]
        self._exchanges = [exchanges_tokens(c) for c in chunks]
        device = next(chunks[0].parameters()).device
        self.streams = Streams(device)
        self.action_clock = ActionClock(device)
        self.graphs = self._chunk_graphs(device)

    def _chunk_graphs(self, device: torch.device) -> list[ChunkGraphs | None]:
        """CUDA graphs for each chunk compiled in a CUDA-graph mode (`Transformer.cuda_graphs`) whose
        layers a graph can hold; a warning says why where one cannot."""
        slots = slots_needed(self.schedule.actions[self.rank], len(self.chunks))
        graphs: list[ChunkGraphs | None] = []
        for c, chunk in enumerate(self.chunks):
            why = graphs_ineligible(chunk, self._exchanges[c], device) if chunk.cuda_graphs else None
            if why is not None:
                warnings.warn(f"pipeline chunk {c} runs without CUDA graphs: {why}", stacklevel=3)
            usable = chunk.cuda_graphs and why is None
            graphs.append(ChunkGraphs(chunk, max(slots[c], 1)) if usable else None)
        return graphs

    @property
    def timings(self) -> list[ActionTiming]:
        """The last step's compute actions, start and end in seconds from the start of the step."""
        return self.action_clock.read()

    # ---- public ----------------------------------------------------------------------------------
    def run(self, microbatches: list[torch.Tensor], loss_scale: float) -> list[tuple[int, LossOutput]]:
        """Forward and backward of every micro-batch; returns the (micro-batch, loss) computed here.

        `loss_scale` multiplies each micro-batch loss before its backward (1 / micro-batches / accumulation).
        """
        return self._execute(self.schedule, microbatches, loss_scale, grad=True)

    def forward_only(
        self, schedule: PipelineSchedule, microbatches: list[torch.Tensor]
    ) -> list[tuple[int, LossOutput]]:
        """Run a forward-only list (see `forward_schedule`) under no_grad."""
        with torch.no_grad():
            return self._execute(schedule, microbatches, 1.0, grad=False)

    # ---- execution ------------------------------------------------------------------------------
    def _execute(
        self, schedule: PipelineSchedule, microbatches: list[torch.Tensor], loss_scale: float, grad: bool
    ) -> list[tuple[int, LossOutput]]:
        if len(microbatches) != schedule.n_microbatches:
            raise ValueError(
                f"the schedule runs {schedule.n_microbatches} micro-batches, got {len(microbatches)}"
            )
        self.action_clock.start()
        self._part_params.clear()  # parameters stay put within a step, not necessarily between steps
        actions = schedule.actions[self.rank]
        state = _State(part_wise=part_wise_forwards(actions, self._compiled, self._exchanges))
        if grad:
            self._prepare_graphs(microbatches)
        i = 0
        while i < len(actions):
            action = actions[i]
            if action.op.is_comm:
                j = i
                while j < len(actions) and actions[j].op.is_comm:
                    j += 1
                self._communicate(actions[i:j], state, microbatches)
                i = j
                continue
            if i + 1 < len(actions) and _follows_its_b(actions, i + 1):
                # nothing runs between this B and its W (typically stage 0: no input gradient to
                # send), so splitting would only walk the parts' graphs twice: one full backward
                self._compute(
                    schedule, Action(Op.BW, action.mb, action.chunk), state, microbatches, loss_scale, grad
                )
                i += 2
                continue
            self._compute(schedule, action, state, microbatches, loss_scale, grad)
            i += 1
        left = sorted(state.tapes) + sorted(state.sends) + sorted(state.input_grads)
        if left:
            raise RuntimeError(f"pipeline rank {self.rank} finished its list with work left for {left[:4]}")
        return state.losses

    def drop_graphs(self) -> None:
        """Free every chunk's CUDA graph captures (a later step captures again): what they hold stays
        allocated in their pools while they live, which a reference cycle could stretch past fitting."""
        for graphs in self.graphs:
            if graphs is not None:
                graphs.drop()

    def _prepare_graphs(self, microbatches: list[torch.Tensor]) -> None:
        """Before a step with gradients: each graphed chunk checks its captures (`prepare_step`) and
        captures now what it must (`ChunkGraphs.capture_for`); one whose experts would synchronise with
        the host in this step's precision runs without graphs."""
        for c, graphs in enumerate(self.graphs):
            why = None if graphs is None else graphs.prepare_step()
            if why is not None:
                warnings.warn(f"pipeline chunk {c} runs without CUDA graphs: {why}", stacklevel=4)
                self.graphs[c] = None
            elif graphs is not None:  # micro-batches are equal splits; every chunk's input has the
                # dtype of the first chunk's parameters (they share one), as the receive buffers do
                graphs.capture_for(self._hidden_buffer(microbatches[0], device="meta"))

    def _compute(
        self,
        schedule: PipelineSchedule,
        action: Action,
        state: _State,
        microbatches: list[torch.Tensor],
        loss_scale: float,
        grad: bool,
    ) -> None:
        start = self.action_clock.mark()
        op = action.op
        if not grad:
            self._forward_no_grad(schedule, action.mb, action.chunk, state, microbatches)
        elif op is Op.F:
            _drain(self._forward(schedule, action.mb, action.chunk, state, microbatches, loss_scale))
        elif op is Op.FB:  # one micro-batch's all-to-all runs while the other computes
            lockstep(
                self._forward(schedule, action.mb, action.chunk, state, microbatches, loss_scale),
                self._backward(schedule, action.mb2, action.chunk2, state, split=False),
            )
        elif op in (Op.B, Op.BW):
            _drain(self._backward(schedule, action.mb, action.chunk, state, split=op is Op.B))
        elif op is Op.W:
            state.tapes.pop((action.mb, action.chunk)).backward_weights()
        self.action_clock.add(str(action), start, self.action_clock.mark())

    def _forward(
        self,
        schedule: PipelineSchedule,
        mb: int,
        c: int,
        state: _State,
        microbatches: list[torch.Tensor],
        loss_scale: float,
    ) -> Iterator[str]:
        """The forward of (mb, c), recording its tape for the backward: part by part (a step each) or
        whole (`part_wise_forwards`)."""
        tokens = microbatches[mb]
        stage = schedule.stage_of(self.rank, c)
        last = stage == schedule.n_stages - 1
        first_input = tokens[:, :-1] if stage == 0 else state.acts.pop((mb, c)).requires_grad_(True)
        tape = Tape()
        chain = Chain()  # its first part (embedding or attention) follows the receive on the compute stream
        state.chains[(mb, c)] = chain
        whole = (mb, c) not in state.part_wise
        graphs, run_layers = self.graphs[c], None
        if graphs is not None and whole:
            slot = state.slots[(mb, c)] = graphs.acquire()
            run_layers = functools.partial(graphs.run_layers, slot)
        yield from forward_parts(
            self.chunks[c],
            tape,
            first_input,
            tokens,
            stage == 0,
            last,
            self.loss_fn,
            loss_scale,
            self.streams,
            chain,
            self._part_params,
            whole=whole,
            run_layers=run_layers,
        )
        self.streams.join(chain)  # the output leaves through NCCL, ordered on the compute stream
        state.tapes[(mb, c)] = tape
        if last:
            state.losses.append((mb, tape.loss))
        else:
            self._hand_on(schedule, mb, c, stage, tape.output.detach(), state)

    def _forward_no_grad(
        self, schedule: PipelineSchedule, mb: int, c: int, state: _State, microbatches: list[torch.Tensor]
    ) -> None:
        chunk, tokens = self.chunks[c], microbatches[mb]
        stage = schedule.stage_of(self.rank, c)
        h = chunk.embed_tokens(tokens[:, :-1]) if stage == 0 else state.acts.pop((mb, c))
        out = chunk.run_layers(h)
        if stage == schedule.n_stages - 1:
            state.losses.append((mb, self.loss_fn(chunk, out, tokens)))
        else:
            self._hand_on(schedule, mb, c, stage, out, state)

    def _hand_on(
        self, schedule: PipelineSchedule, mb: int, c: int, stage: int, out: torch.Tensor, state: _State
    ) -> None:
        """Give a stage output to the next stage: in memory on this rank, else keep it for SEND_ACT."""
        nxt_rank, nxt_chunk = schedule.locate(mb, stage + 1)
        if nxt_rank == self.rank:
            state.acts[(mb, nxt_chunk)] = out
        else:
            state.sends[(mb, c)] = out

    def _backward(
        self, schedule: PipelineSchedule, mb: int, c: int, state: _State, split: bool
    ) -> Iterator[str]:
        """The backward of (mb, c) part by part; `split` leaves the weight gradients for W."""
        tape = state.tapes[(mb, c)]
        stage = schedule.stage_of(self.rank, c)
        grad_out = None if stage == schedule.n_stages - 1 else state.grads.pop((mb, c))
        chain = state.chains.pop((mb, c))
        self.streams.resume(chain)  # after the receive of its output gradient
        yield from tape.backward_parts(grad_out, split, self.streams, chain)
        self.streams.join(chain)
        if not split:
            del state.tapes[(mb, c)]
        input_grad = tape.input_grad
        slot = state.slots.pop((mb, c), None)
        if slot is not None:  # a graphed backward runs whole: the slot is free again
            self.graphs[c].release(slot)  # type: ignore[union-attr]
            # the input gradient lives in the slot's static buffers, which its next replay overwrites; no
            # schedule here hands it on after that, but its consumer (a send, or another chunk's
            # backward) should not depend on the order of the list
            input_grad = None if input_grad is None else input_grad.clone()
        if stage > 0:
            prev_rank, prev_chunk = schedule.locate(mb, stage - 1)
            if prev_rank == self.rank:
                state.grads[(mb, prev_chunk)] = input_grad
            else:
                state.input_grads[(mb, c)] = input_grad

    def _communicate(
        self, actions: tuple[Action, ...], state: _State, microbatches: list[torch.Tensor]
    ) -> None:
        ops = []
        for a in actions:
            peer = self._peer_ranks[a.peer]
            key = (a.mb, a.chunk)
            if a.op is Op.SEND_ACT:
                ops.append(dist.P2POp(dist.isend, state.sends.pop(key).contiguous(), peer, self.group))
            elif a.op is Op.SEND_GRAD:
                ops.append(dist.P2POp(dist.isend, state.input_grads.pop(key).contiguous(), peer, self.group))
            else:
                buf = self._hidden_buffer(microbatches[a.mb])
                (state.acts if a.op is Op.RECV_ACT else state.grads)[key] = buf
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        transfers = ", ".join(f"{a} (pipeline rank {a.peer})" for a in actions)
        with collective(f"pipeline rank {self.rank}'s P2P group [{transfers}]", self.group, "pp"):
            for req in dist.batch_isend_irecv(ops):
                req.wait()

    def _hidden_buffer(self, tokens: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """A receive buffer for one micro-batch's hidden state: (batch, seq, dim), on the chunks'
        device unless `device` is given."""
        chunk = self.chunks[0]
        weight = next(chunk.parameters())
        return torch.empty(
            tokens.shape[0],
            tokens.shape[1] - 1,
            chunk.config.dim,
            dtype=weight.dtype,
            device=device or weight.device,
        )


def part_wise_forwards(
    actions: Sequence[Action], compiled: Sequence[bool], exchanges: Sequence[bool]
) -> set[tuple[int, int]]:
    """The (micro-batch, chunk)s of a rank's list to record part by part.

    Both halves of every FB in a chunk whose MoE layers exchange tokens with other ranks (`exchanges`,
    expert parallelism): one half steps a part at a time against the other, so one micro-batch's
    all-to-all runs while the other computes. A chunk that exchanges nothing has nothing to overlap:
    its FB runs both halves whole, one after the other (the backward first, which frees its
    activations before the forward keeps new ones).

    And, in an eager chunk, those whose W runs apart from their B: a W walks its recorded graph again
    for the weights, and over a whole chunk it must pass through every layer's input gradients (and
    repeat the expert all-to-alls) to reach the first layers' weights, where a part-wise W starts at
    each part's own output gradient and skips the parts without weights. A compiled chunk's B runs
    whole, leaving its W nothing to walk.
    """
    parts = set()
    for i, a in enumerate(actions):
        if a.op is Op.FB:
            parts.update(k for k in ((a.mb, a.chunk), (a.mb2, a.chunk2)) if exchanges[k[1]])
        elif a.op is Op.W and not compiled[a.chunk] and not _follows_its_b(actions, i):
            parts.add((a.mb, a.chunk))
    return parts


def _follows_its_b(actions: Sequence[Action], i: int) -> bool:
    """Whether action i is a W right after its own B (sends and receives count as in between): the
    runtime then runs the two as one full backward."""
    a = actions[i]
    return a.op is Op.W and i > 0 and actions[i - 1] == Action(Op.B, a.mb, a.chunk)


def _drain(steps: Iterator[str]) -> None:
    for _ in steps:
        pass


def forward_schedule(schedule: PipelineSchedule) -> PipelineSchedule:
    """A forward-only list over the same layout (validation and test): every micro-batch in the
    first direction, each rank running its chunks' forwards in stage order, GPipe style."""
    from lightning_dsv3.pipeline.schedules import insert_communication

    direction = schedule.chunk_directions[0]
    chunks = [c for c in range(schedule.n_chunks) if schedule.chunk_directions[c] == direction]
    actions = []
    for rank in range(schedule.pp):
        order = sorted(chunks, key=lambda c: schedule.stage_of(rank, c))
        actions.append(tuple(Action(Op.F, mb, c) for c in order for mb in range(schedule.n_microbatches)))
    plain = PipelineSchedule(
        name=f"{schedule.name}-forward",
        pp=schedule.pp,
        n_microbatches=schedule.n_microbatches,
        n_chunks=schedule.n_chunks,
        n_stages=schedule.n_stages,
        stage_map=schedule.stage_map,
        chunk_directions=schedule.chunk_directions,
        mb_directions=(direction,) * schedule.n_microbatches,
        actions=tuple(actions),
    )
    return insert_communication(plain)
